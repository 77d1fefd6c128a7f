"""A fingerprinted on-disk cache for passages, indexes, retrievals and adapters.

An entry is a folder `ROOT/<kind>/<fingerprint>/` holding the files a builder wrote and a
`manifest.json` with its key and each file's sha256, written last. An entry whose manifest is
missing, holds another key (an entry moved or copied in), or whose files do not match it (an
interrupted build, a corrupted file) is rebuilt.

An entry is built in `<fingerprint>.partial-<pid>/` and renamed into place in one step, so
processes building the same entry at once never see half an entry: the first to publish wins
and the others load its entry. A partial folder whose process has died is removed.

A plugin's entries are keyed by its code too (`Cache.scoped`), so changing the code builds them
again; a cache that counts entries built before a time as missing (`stale_before`) rebuilds
everything a run reads (`raghub run --force`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

T = TypeVar("T")
MANIFEST = "manifest.json"
#: `<fingerprint>.partial-<pid>` (a build) or `<fingerprint>.trash-<pid>-<id>` (being deleted)
SCRATCH_FOLDER = re.compile(r".+\.(?:partial|trash)-(\d+)(?:-\w+)?")


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


def fingerprint_items(items: Iterable[Any]) -> str:
    """`fingerprint(list(items))`, computed streaming: the items are never all in memory."""
    digest = hashlib.sha256(b"[[")
    for position, item in enumerate(items):
        digest.update((", " if position else "").encode()
                      + json.dumps(item, sort_keys=True, default=str, ensure_ascii=False).encode())
    digest.update(b"]]")
    return digest.hexdigest()[:20]


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_fingerprint(paths: Sequence[Path], root: Path) -> str:
    """A hash of files' names (relative to `root`) and contents. Each file's sha256 is cached
    under its path, size, modification time and inode change time (which no copying tool can
    set back), so an unchanged file is not read again."""
    cache = Cache(cache_root())

    def sha256(path: Path) -> str:
        found = path.stat()
        key = {"path": str(path.resolve()), "size": found.st_size, "mtime_ns": found.st_mtime_ns,
               "ctime_ns": found.st_ctime_ns}
        return cache.json("file-sha256", key, lambda: file_sha256(path))

    return fingerprint([(str(path.relative_to(root)), sha256(path)) for path in paths])


def path_fingerprint(path: Path) -> str:
    """A hash of a file's content, or of every file in a folder (names and contents)."""
    if path.is_file():
        return files_fingerprint([path], path.parent)
    return files_fingerprint(sorted(file for file in path.rglob("*") if file.is_file()), path)


def process_is_alive(pid: int) -> bool:
    """True when a process with this id exists (possibly another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to another user
        pass
    return True


def discard(folder: Path) -> None:
    """Remove a folder: first renamed aside in one step, so its path is at once free."""
    trash = folder.with_name(f"{folder.name}.trash-{os.getpid()}-{uuid.uuid4().hex}")
    try:
        folder.rename(trash)
    except FileNotFoundError:  # another process discarded it first
        return
    shutil.rmtree(trash, ignore_errors=True)


def remove_orphaned_scratch(kind_folder: Path) -> None:
    """Remove the partial builds and trash folders left by processes that have died."""
    for folder in kind_folder.iterdir() if kind_folder.is_dir() else ():
        match = SCRATCH_FOLDER.fullmatch(folder.name)
        if match and not process_is_alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)


def _entry_name(key: Any, scope: Any) -> str:
    """The folder name of the entry for `key` in a cache of `scope` (None: unscoped)."""
    return fingerprint(key if scope is None else {"key": key, "scope": scope})


class Cache:
    """Folders of files keyed by the fingerprint of everything they depend on: the key, and the
    `scope` (the code of the plugin that reads them) when there is one. With `stale_before`
    (seconds since the epoch), an entry built earlier counts as missing and is built again."""

    def __init__(self, root: str | Path, scope: Any = None, stale_before: float | None = None):
        self.root = Path(root)
        self.scope = scope
        self.stale_before = stale_before

    def scoped(self, scope: Any) -> "Cache":
        """This cache with every key also keyed by `scope`."""
        return Cache(self.root, scope, self.stale_before)

    def entry_path(self, kind: str, key: Any) -> Path:
        return self.root / kind / _entry_name(key, self.scope)

    def is_valid(self, folder: Path) -> bool:
        """True when the folder's manifest exists, was written for the key the folder is named
        after (not another entry's, moved here) no earlier than `stale_before`, and every file
        matches its checksum."""
        try:
            if self.stale_before is not None and (folder / MANIFEST).stat().st_mtime < self.stale_before:
                return False
            manifest = json.loads((folder / MANIFEST).read_text())
            return _entry_name(manifest["key"], manifest.get("scope")) == folder.name and all(
                file_sha256(folder / name) == digest for name, digest in manifest["files"].items())
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
                discard(folder)
        remove_orphaned_scratch(folder.parent)
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            build(partial)
            files = {p.name: file_sha256(p) for p in sorted(partial.iterdir()) if p.is_file()}
            manifest = {"key": key, "scope": self.scope, "files": files}
            (partial / MANIFEST).write_text(json.dumps(manifest, default=str))
            self.publish(partial, folder)
        finally:  # left when the build failed or another process published first
            shutil.rmtree(partial, ignore_errors=True)
        return load(folder)

    def publish(self, partial: Path, folder: Path) -> None:
        """Rename the built `partial` to `folder` in one step. A valid entry already there
        (another process published first) is kept; an invalid one is discarded first."""
        while True:
            try:
                partial.rename(folder)
                return
            except OSError as error:
                if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if self.is_valid(folder):
                return
            discard(folder)

    def json(self, kind: str, key: Any, compute: Callable[[], Any]) -> Any:
        """A JSON-serialisable value, computed once per key."""

        def build(folder: Path) -> None:
            (folder / "value.json").write_text(json.dumps(compute()))

        return self.get_or_build(kind, key, build, lambda folder: json.loads((folder / "value.json").read_text()))
