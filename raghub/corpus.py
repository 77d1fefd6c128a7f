"""Reading a user's passages (`--corpus`, `--cloud-corpus`, `raghub cloud serve --corpus`):
one reader for every place that takes a corpus file.

- `.jsonl`: one object per line with `text`, and optionally `id` and `title`;
- `.tsv`: a header row naming `text` and optionally `id` and `title` (DPR's psgs_w100.tsv);
- any other file: plain text, one passage per block of lines between blank lines.

A passage without an id gets its position in the file. A `.jsonl` or `.tsv` corpus is read
streaming, in one pass that checks every row. Above `STREAM_ABOVE_BYTES` only each row's byte
offset is kept, and the passages are read from the file when iterated or indexed, so DPR's
13 GB Wikipedia never sits in memory; a smaller file's passages are kept in a list.
"""

from __future__ import annotations

import csv
import json
from array import array
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Sequence

from raghub.errors import UsageError
from raghub.interfaces import Passage

STRUCTURED_SUFFIXES = (".jsonl", ".tsv")
#: the longest .tsv field read: csv's default, 128 KiB, is shorter than some passages; this
#: one (2 GiB) fits the C long csv keeps it in on every platform
TSV_FIELD_LIMIT = 2**31 - 1
#: structured corpus files larger than this are read from disk on demand rather than held
STREAM_ABOVE_BYTES = 256 << 20
FORMATS_HELP = ("a .jsonl of {\"id\", \"title\", \"text\"} objects, a .tsv with id, title, text "
                "columns, or a text file of blank-line-separated passages")


def _lines(handle: BinaryIO) -> Iterator[tuple[int, str]]:
    """(byte offset, line) from the handle's position on, split at \\n only (JSON may hold U+2028)."""
    offset = handle.tell()
    for raw in handle:
        yield offset, raw.decode("utf-8")
        offset += len(raw)


def _jsonl_rows(path: Path, handle: BinaryIO) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, (offset, line) in enumerate(_lines(handle), start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(f"corpus {path}, line {number}: not JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise UsageError(f"corpus {path}, line {number}: not an object")
            yield offset, row


def tsv_reader(lines: Iterable[str]) -> Iterator[list[str]]:
    """`csv.reader` over tab-separated lines, reading fields up to `TSV_FIELD_LIMIT` long."""
    csv.field_size_limit(TSV_FIELD_LIMIT)
    return csv.reader(lines, delimiter="\t")


def _tsv_rows(handle: BinaryIO, header: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """The rows after the header, as dicts by its names; a quoted field may span lines."""
    started: list[int] = []  # offsets of the lines the csv reader took since the last row

    def text() -> Iterator[str]:
        for offset, line in _lines(handle):
            started.append(offset)
            yield line

    for values in tsv_reader(text()):
        if values:  # csv.DictReader skips blank lines too
            yield started[0], dict(zip(header, values))
        started.clear()


def _text_rows(handle: BinaryIO) -> Iterator[dict[str, Any]]:
    """A line of only spaces separates passages too (WikiText's raw files have them)."""
    block: list[str] = []
    for line in [*handle.read().decode("utf-8").replace("\r\n", "\n").split("\n"), ""]:
        if line.strip():
            block.append(line)
        elif block:
            yield {"text": "\n".join(block)}
            block = []


def _passage(path: Path, position: int, row: dict[str, Any]) -> Passage:
    if not isinstance(row.get("text"), str):
        raise UsageError(f"corpus {path}: passage {position + 1} has no text; each passage "
                         "needs `text` (and optionally `id` and `title`)")
    given_id = row.get("id")
    return Passage(id=str(position if given_id in (None, "") else given_id), text=row["text"],
                   title=str(row.get("title") or ""))


class CorpusFile(Sequence[Passage]):
    """The passages of a .jsonl or .tsv file, read from it on demand; holds only their offsets."""

    def __init__(self, path: Path):
        self.path = path
        self.offsets = array("q")
        self.header: list[str] = []
        with open(path, "rb") as handle:
            if path.suffix == ".tsv":
                self.header = next(tsv_reader([handle.readline().decode("utf-8")]), [])
            for position, (offset, row) in enumerate(self._rows(handle)):
                _passage(path, position, row)
                self.offsets.append(offset)

    def _rows(self, handle: BinaryIO) -> Iterator[tuple[int, dict[str, Any]]]:
        return _tsv_rows(handle, self.header) if self.path.suffix == ".tsv" else _jsonl_rows(self.path, handle)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int | slice) -> Any:  # a Passage, or a list of them for a slice
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        position = range(len(self))[index]  # IndexError past the end, negative positions allowed
        with open(self.path, "rb") as handle:
            handle.seek(self.offsets[position])
            _, row = next(self._rows(handle))
        return _passage(self.path, position, row)

    def __iter__(self) -> Iterator[Passage]:
        """Every passage, in one sequential read of the file."""
        with open(self.path, "rb") as handle:
            if self.path.suffix == ".tsv":
                handle.readline()
            for position, (_, row) in enumerate(self._rows(handle)):
                yield _passage(self.path, position, row)


def read_corpus(path: str | Path) -> Sequence[Passage]:
    """The passages of a corpus file (streamed from a .jsonl or .tsv); UsageError naming the
    file and what is wrong."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"corpus file not found: {path} (give {FORMATS_HELP})")
    try:
        if file.suffix in STRUCTURED_SUFFIXES:
            passages: Sequence[Passage] = CorpusFile(file)
            if file.stat().st_size <= STREAM_ABOVE_BYTES:
                passages = list(passages)
        else:
            with open(file, "rb") as handle:
                passages = [_passage(file, position, row) for position, row in enumerate(_text_rows(handle))]
    except UnicodeDecodeError:
        raise UsageError(f"corpus {path} is not UTF-8 text (give {FORMATS_HELP})") from None
    if not passages:
        raise UsageError(f"corpus {path} holds no passages (give {FORMATS_HELP})")
    return passages
