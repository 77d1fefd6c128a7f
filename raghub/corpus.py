"""Reading a user's passages (`--corpus`, `--cloud-corpus`, `raghub cloud serve --corpus`):
one reader for every place that takes a corpus file.

- `.jsonl`: one object per line with `text`, and optionally `id` and `title`;
- `.tsv`: a header row naming `text` and optionally `id` and `title` (DPR's psgs_w100.tsv);
- any other file: plain text, one passage per block of lines between blank lines.

A passage without an id gets its position in the file.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable

from raghub.errors import UsageError
from raghub.interfaces import Passage

STRUCTURED_SUFFIXES = (".jsonl", ".tsv")
FORMATS_HELP = ("a .jsonl of {\"id\", \"title\", \"text\"} objects, a .tsv with id, title, text "
                "columns, or a text file of blank-line-separated passages")


def _rows(path: Path, text: str) -> Iterable[dict[str, Any]]:
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON may hold U+2028
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UsageError(f"corpus {path}, line {number}: not JSON ({error.msg})") from None
                if not isinstance(row, dict):
                    raise UsageError(f"corpus {path}, line {number}: not an object")
                yield row
    elif path.suffix == ".tsv":
        yield from csv.DictReader(io.StringIO(text, newline=""), delimiter="\t")
    else:  # a line of only spaces separates passages too (WikiText's raw files have them)
        block: list[str] = []
        for line in [*text.replace("\r\n", "\n").split("\n"), ""]:
            if line.strip():
                block.append(line)
            elif block:
                yield {"text": "\n".join(block)}
                block = []


def read_corpus(path: str | Path) -> list[Passage]:
    """The passages of a corpus file; UsageError naming the file and what is wrong."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"corpus file not found: {path} (give {FORMATS_HELP})")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"corpus {path} is not UTF-8 text (give {FORMATS_HELP})") from None
    passages = []
    for position, row in enumerate(_rows(file, text)):
        if not isinstance(row.get("text"), str):
            raise UsageError(f"corpus {path}: passage {position + 1} has no text; each passage "
                             "needs `text` (and optionally `id` and `title`)")
        given_id = row.get("id")
        passages.append(Passage(id=str(position if given_id in (None, "") else given_id), text=row["text"],
                                title=str(row.get("title") or "")))
    if not passages:
        raise UsageError(f"corpus {path} holds no passages (give {FORMATS_HELP})")
    return passages
