"""A fingerprinted on-disk cache for passages, indexes, retrievals and adapters.

An entry is a folder `ROOT/<kind>/<fingerprint>/` holding the files a builder wrote and a
`manifest.json` with each file's sha256, written last. An entry whose manifest is missing or
whose files do not match it (an interrupted build, a corrupted file) is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")
MANIFEST = "manifest.json"


def cache_root() -> Path:
    """`RAGHUB_CACHE`, else `$XDG_CACHE_HOME/raghub`, else `~/.cache/raghub`."""
    if os.environ.get("RAGHUB_CACHE"):
        return Path(os.environ["RAGHUB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "raghub"


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (dict key order does not matter)."""
    text = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Cache:
    """Folders of files keyed by the fingerprint of everything they depend on."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def entry_path(self, kind: str, key: Any) -> Path:
        return self.root / kind / fingerprint(key)

    def is_valid(self, folder: Path) -> bool:
        """True when the folder's manifest exists and every file matches its checksum."""
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            return all(file_sha256(folder / name) == digest for name, digest in manifest["files"].items())
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def get_or_build(
        self, kind: str, key: Any, build: Callable[[Path], None], load: Callable[[Path], T]
    ) -> T:
        """`load(folder)` of a valid entry; else `build(folder)` into a fresh one first.

        `key` must capture everything the entry depends on; it is stored beside the files.
        """
        folder = self.entry_path(kind, key)
        if self.is_valid(folder):
            try:
                return load(folder)
            except Exception:  # unreadable despite matching checksums: rebuild it
                pass
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        build(partial)
        files = {p.name: file_sha256(p) for p in sorted(partial.iterdir()) if p.is_file()}
        (partial / MANIFEST).write_text(json.dumps({"key": key, "files": files}, default=str))
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
        return load(folder)

    def json(self, kind: str, key: Any, compute: Callable[[], Any]) -> Any:
        """A JSON-serialisable value, computed once per key."""

        def build(folder: Path) -> None:
            (folder / "value.json").write_text(json.dumps(compute()))

        return self.get_or_build(kind, key, build, lambda folder: json.loads((folder / "value.json").read_text()))
