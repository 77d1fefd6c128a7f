"""The `language-modelling` task family: WikiText-style loss with DRAGON / REPLUG windows.

The evaluated text is the split's non-empty lines, each ending in "\\n" (what the official
`wiki.test.raw` holds once its blank lines are dropped). Every format gives exactly this text:
the hub's rows (JSONL / parquet / arrow, `{"text": ...}`), the raw file, and the rows joined with
"\\n\\n" (DRAGON's and HF's convention, whose runs of blank lines a raw file cannot restore, which
is why blank lines are not part of the text).

Windows (REPLUG / DRAGON): the tokens after the first are cut into consecutive target spans of
`pred_len + 1` tokens; each window conditions on the `context_len` tokens before its span,
retrieves with those tokens decoded as its query, and the first window retrieves nothing. With
`--stride N` the In-Context RALM protocol is used instead: spans of N tokens, the last
`ralm.query_len` tokens as the query, and the context shortened so that a retrieved document
plus the context plus the span fit in `ralm.max_length` tokens.

Articles (` = Title = ` lines; the text before the first is one too) are the passages' and
windows' `group`: with `--datastore heldout-articles` the passages are the evaluated split's own
lines, no target span crosses an article boundary, and each window excludes its article's passages. The default
`--datastore auto` is the train split when it is there, else heldout-articles (said on stderr).
"""

from __future__ import annotations

import bisect
import math
import re
from functools import cached_property
from itertools import accumulate
from pathlib import Path
from typing import Any, Sequence

from raghub import (Field, Option, Passage, Retrieved, STRUCTURED_SUFFIXES, Task, UsageError, Window, bits_per_byte,
                    data_path, file_sha256, first_words, hookimpl, load_hub_dataset, logprobs_from, nats_per_token,
                    notice, perplexity, perplexity_standard_error, read_corpus, read_data_json_lines, read_data_text)

ARTICLE_TITLE = re.compile(r" = [^=].* = ")
#: the article of the lines before the first title: an article of its own, excluded from its windows
BEFORE_FIRST_TITLE = "(before the first article title)"
#: characters of a window's scored text read for its first words (the samples log)
SPAN_START_CHARS = 200
#: the task YAML key both protocols share: how much of each retrieved passage the model reads
RETRIEVED_MAX_LENGTH = Field(int, required=True, at_least=1, help="tokens kept of each retrieved passage")


# --------------------------------------------------------------------------- reading the text


def read_rows(path: Path) -> list[str]:
    """The text rows of a WikiText file: hub rows (.jsonl / .parquet / .arrow) or raw text. A
    file that is truncated, not UTF-8, empty, or has a row without text is a UsageError naming it."""
    if path.suffix == ".jsonl":
        rows = []
        for number, row in read_data_json_lines(path):
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise UsageError(f"{path}, line {number}: no 'text' string; each line of a WikiText "
                                 'JSONL file is a row {"text": ...}')
            rows.append(row["text"])
        return rows
    if path.suffix in (".parquet", ".arrow"):
        import datasets

        table = (datasets.Dataset.from_parquet(str(path)) if path.suffix == ".parquet"
                 else datasets.Dataset.from_file(str(path)))
        return table["text"]
    return [read_data_text(path)]


def text_lines(rows: Sequence[str]) -> list[str]:
    """The non-empty lines of the rows (CRLF normalised), without their line ends."""
    return [line for row in rows for line in row.replace("\r\n", "\n").split("\n") if line.strip()]


def is_article_title(line: str) -> bool:
    """A ` = Title = ` line whose first letter is a capital, as every Wikipedia title's is.
    Formulas broken across lines leave lines such as ` = 1 henry and capacitance C = ` inside
    WikiText articles; their first letter is lower case."""
    first_letter = next((char for char in line if char.isalpha()), "")
    return bool(ARTICLE_TITLE.fullmatch(line)) and first_letter.isupper()


def article_of_lines(lines: Sequence[str]) -> list[str]:
    """Each line's article: the title of the last article title line at or before it
    (`BEFORE_FIRST_TITLE` before the first)."""
    titles, current = [], BEFORE_FIRST_TITLE
    for line in lines:
        if is_article_title(line):
            current = line.strip(" =")
        titles.append(current)
    return titles


def chunk_passages(lines: Sequence[str], groups: Sequence[str], label: str,
                   words_per_passage: int = 64, min_words: int = 10) -> list[Passage]:
    """DRAGON / REPLUG passages: each line of at least `min_words` words cut into consecutive,
    non-overlapping chunks of `words_per_passage` words."""
    passages = []
    for line, group in zip(lines, groups):
        words = line.split()
        if len(words) < min_words:
            continue
        for first in range(0, len(words), words_per_passage):
            text = " ".join(words[first : first + words_per_passage])
            passages.append(Passage(id=f"{label}-{len(passages)}", text=text, group=group))
    return passages


def token_char_starts(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Token ids of `text` (no special tokens) and the character offset where each starts."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [start for start, _ in encoded["offset_mapping"]]


def byte_offsets(text: str, char_positions: Sequence[int]) -> list[int]:
    """The UTF-8 byte offset of each character position of `text`."""
    byte_at_char = [0, *accumulate(len(ch.encode("utf-8")) for ch in text)]
    return [byte_at_char[position] for position in char_positions]


def target_spans(n_tokens: int, span_len: int, boundaries: Sequence[int] = ()) -> list[tuple[int, int]]:
    """[start, end) spans covering tokens 1 .. n_tokens-1 exactly once, `span_len` long, cut
    at each token position in `boundaries`."""
    cuts = sorted({1, n_tokens, *(b for b in boundaries if 1 < b < n_tokens)})
    return [(start, min(start + span_len, end))
            for begin, end in zip(cuts, cuts[1:]) for start in range(begin, end, span_len)]


# --------------------------------------------------------------------------- the task family


class LanguageModelling(Task):
    """Perplexity and bits per byte of a text, with or without retrieved passages."""

    family = "language-modelling"
    description = "language modelling: nats per token, perplexity and bits per byte"
    higher_is_better = {"nats_per_token": False, "ppl": False, "bits_per_byte": False}
    entry_point = "score_windows"
    requires = frozenset({"sequence_logprobs"})
    options = {
        "split": Option(("test", "validation"), "test", "the split to evaluate"),
        "datastore": Option(("auto", "train", "heldout-articles"), "auto",
                            "passages to retrieve from: the train split of the same data, the "
                            "evaluated split's other articles (leave-one-article-out), or auto: "
                            "train when the data folder has it, else heldout-articles"),
        "corpus": Option(str, "", "a corpus file used as the datastore instead: .jsonl / .tsv of "
                                  "id, title, text passages, or a text file cut into 64-word passages"),
        "context_len": Option(int, None, "tokens of preceding text each window conditions on "
                                         "(task default: 128)", at_least=1),
        "pred_len": Option(int, None, "each window scores pred_len + 1 new tokens (task default: 768)", at_least=1),
        "retrieved_max_length": Option(int, None, "tokens kept of each retrieved passage "
                                                  "(task default: 128)", at_least=1),
        "stride": Option(int, 0, "In-Context RALM protocol: score N tokens per window, retrieving "
                                 "with the last 32 tokens (the paper uses 4); 0 = DRAGON/REPLUG windows",
                         at_least=0),
    }

    definition_schema = {
        "data": Field({
            "hub": Field(str, required=True, help="the Hugging Face dataset read without a data directory"),
            "config": Field(str, required=True, help="its configuration name"),
            "folder": Field(str, required=True, help="the data directory's folder holding the files"),
            "files": Field({split: Field(list, help=f"candidate files of the {split} split, the first found "
                                                    "is read (.jsonl rows of `text`, .parquet, raw text)")
                            for split in ("test", "validation", "train")},
                           required=True, help="each split's candidate files in `folder`")},
            required=True, help="where the text is read from"),
        "passages": Field({"words": Field(int, required=True, at_least=1, help="words per datastore passage"),
                           "min_words": Field(int, required=True, at_least=0,
                                              help="a line of the text with fewer words gives no passage")},
                          required=True, help="how the datastore text is cut into passages"),
        "windows": Field({"context_len": Field(int, required=True, at_least=1,
                                               help="tokens of preceding text each window conditions on"),
                          "pred_len": Field(int, required=True, at_least=1,
                                            help="each window scores pred_len + 1 new tokens"),
                          "retrieved_max_length": RETRIEVED_MAX_LENGTH},
                         required=True, help="the DRAGON / REPLUG windows (`--stride 0`)"),
        "ralm": Field({"query_len": Field(int, required=True, at_least=1,
                                          help="the last tokens before a window that form its query"),
                       "max_length": Field(int, required=True, at_least=1,
                                           help="tokens of the model input: passage, context and window"),
                       "retrieved_max_length": RETRIEVED_MAX_LENGTH},
                      required=True, help="the In-Context RALM protocol (`--stride N`)"),
    }

    def check(self) -> None:
        """The windows' protocol (e.g. --stride against ralm.max_length) fits, every file the
        YAML names lies inside the data directory, and the evaluated split is there and reads
        (once, kept for the run): each raises a UsageError otherwise. The datastore is chosen
        here, before the model loads."""
        assert self.protocol and self.datastore
        if self.data_dir is not None:
            for split in self.config["data"]["files"]:
                self._split_files(split)
            self.lines  # noqa: B018 (read for its errors)

    # ---- protocol

    def _protocol_value(self, key: str, section: dict[str, Any]) -> int:
        value = self.settings.get(key)
        value = section[key] if value is None else value
        if not isinstance(value, int) or value < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be a positive integer, not {value!r}")
        return value

    @cached_property
    def protocol(self) -> dict[str, int]:
        """span_len, context_len, query_len and retrieved_max_length of this run's windows."""
        stride = self.settings["stride"]
        if stride == 0:
            windows = self.config["windows"]
            context_len = self._protocol_value("context_len", windows)
            return {"span_len": self._protocol_value("pred_len", windows) + 1,
                    "context_len": context_len, "query_len": context_len,
                    "retrieved_max_length": self._protocol_value("retrieved_max_length", windows)}
        ralm = self.config["ralm"]
        retrieved_max_length = self._protocol_value("retrieved_max_length", ralm)
        room = ralm["max_length"] - retrieved_max_length - stride
        if self.settings["context_len"] is None and room < 1:
            raise UsageError(f"--stride {stride} with --retrieved-max-length {retrieved_max_length} "
                             f"leaves no context within max_length {ralm['max_length']}")
        context_len = self._protocol_value("context_len", {"context_len": room})
        return {"span_len": stride, "context_len": context_len, "query_len": ralm["query_len"],
                "retrieved_max_length": retrieved_max_length}

    def fingerprint(self) -> dict[str, Any]:
        """With the sha256 of the evaluated split's file, so that a run after it changed is a new
        run, never the stored one or a resume file's (the datastore's text is the corpus's)."""
        evaluated = self._split_file(self.settings["split"]) if self.data_dir is not None else None
        return {**super().fingerprint(), "datastore": self.datastore, "protocol": self.protocol,
                "split_sha256": evaluated and file_sha256(evaluated)}

    # ---- data

    def _split_files(self, split: str) -> list[Path]:
        """The data directory's candidate files of a split, in the YAML's order."""
        source = self.config["data"]
        return [data_path(self.data_dir, source["folder"], name,
                          source=self.config.get("source", f"task {self.name}"))
                for name in source["files"].get(split, [])]

    def _split_file(self, split: str) -> Path | None:
        """The first of the split's files found in the data directory (None: none there)."""
        return next((path for path in self._split_files(split) if path.is_file()), None)

    def _split_rows(self, split: str) -> list[str]:
        """The rows of a split from the data directory, else from the hub."""
        source = self.config["data"]
        if self.data_dir is None:
            return load_hub_dataset(self.name, source["hub"], source["config"], split)["text"]
        found = self._split_file(split)
        if found is None:
            folder, names = Path(self.data_dir) / source["folder"], source["files"].get(split, [])
            instead = "; or retrieve from --datastore heldout-articles or --corpus PATH" if split == "train" else ""
            raise UsageError(
                f"task {self.name}: the {split} split is missing: expected {' or '.join(names)} in "
                f"{folder} (save datasets.load_dataset('{source['hub']}', '{source['config']}', "
                f"split='{split}') rows as JSONL there, or unset RAGHUB_DATA_DIR to read the hub){instead}"
            )
        return read_rows(found)

    def _split_lines(self, split: str) -> list[str]:
        """The non-empty lines of a split; a split without any is a UsageError naming its source."""
        lines = text_lines(self._split_rows(split))
        if not lines:
            source = self.config["data"]
            where = (self._split_file(split) if self.data_dir is not None
                     else f"the hub's {source['hub']} ({source['config']}) {split} split")
            raise UsageError(f"task {self.name}: {where} holds no text: every row is empty")
        return lines

    @cached_property
    def lines(self) -> list[str]:
        """The evaluated split's non-empty lines."""
        return self._split_lines(self.settings["split"])

    @cached_property
    def datastore(self) -> str:
        """`train` or `heldout-articles` (`auto`: train when the data folder or the hub has it,
        otherwise heldout-articles); `corpus file` with --corpus."""
        if self.settings["corpus"]:
            return "corpus file"
        if self.settings["datastore"] != "auto":
            return self.settings["datastore"]
        if self.data_dir is None or self._split_file("train") is not None:
            return "train"
        return "heldout-articles"

    @property
    def heldout_articles(self) -> bool:
        return self.datastore == "heldout-articles"

    def examples(self, model, limit: int | None) -> list[Window]:
        lines = self.lines
        if self.settings["datastore"] == "auto" and self.heldout_articles:
            notice(f"task {self.name}: no train split in {Path(self.data_dir) / self.config['data']['folder']}, "
                   "so retrieving from the evaluated split's other articles (--datastore heldout-articles)")
        text = "".join(line + "\n" for line in lines)
        ids, char_starts = token_char_starts(model.tokenizer, text)
        # the text's end closes the last span, so span bytes add up to the whole text's
        byte_starts = byte_offsets(text, [*char_starts, len(text)])
        char_ends = [*char_starts[1:], len(text)]  # where each token's text ends
        line_starts = list(accumulate((len(line) + 1 for line in lines), initial=0))
        articles = article_of_lines(lines)
        article_of_token = [articles[bisect.bisect_right(line_starts, c) - 1] for c in char_starts]
        boundaries = ([i for i in range(1, len(ids)) if article_of_token[i] != article_of_token[i - 1]]
                      if self.heldout_articles else [])
        spans = target_spans(len(ids), self.protocol["span_len"], boundaries)[:limit]
        context_len, query_len = self.protocol["context_len"], self.protocol["query_len"]
        return [
            Window(
                id=f"{self.settings['split']}-{start}",
                query=model.decode(ids[max(0, start - query_len) : start]) if start > 1 else "",
                exclude_group=article_of_token[start] if self.heldout_articles else "",
                context_ids=ids[max(0, start - context_len) : start],
                target_ids=ids[start:end],
                retrieved_max_length=self.protocol["retrieved_max_length"],
                n_bytes=byte_starts[end] - byte_starts[start],
                text_start=first_words(text[char_starts[start] : min(char_ends[end - 1], char_starts[start]
                                                                      + SPAN_START_CHARS)]),
            )
            for start, end in spans
        ]

    def corpus(self) -> tuple[list[Passage], str]:
        source = self.config["data"]
        if self.settings["corpus"]:
            path = Path(self.settings["corpus"]).expanduser()
            passages, label = read_corpus(path), f"corpus file {path.name}"
            if path.suffix in STRUCTURED_SUFFIXES:
                return passages, label
            lines = text_lines([passage.text for passage in passages])
            return chunk_passages(lines, article_of_lines(lines), path.stem), label
        if self.heldout_articles:
            label = f"{source['config']} {self.settings['split']}, other articles (heldout-articles)"
            lines = self.lines
        else:
            label = f"{source['config']} train"
            lines = self._split_lines("train")
        passages = chunk_passages(lines, article_of_lines(lines), self.name,
                                  self.config["passages"]["words"], self.config["passages"]["min_words"])
        if self.heldout_articles and len({passage.group for passage in passages}) == 1:
            raise UsageError(f"task {self.name}: --datastore heldout-articles needs at least two articles "
                             "(` = Title = ` lines) with passages in the evaluated text, since each window "
                             "excludes its own; retrieve from --datastore train or --corpus PATH instead")
        return passages, f"{label}, {self.config['passages']['words']}-word passages"

    # ---- scoring

    def evaluate(self, method, examples: Sequence[Window],
                 retrieved: Sequence[Sequence[Retrieved]]) -> list[dict[str, Any]]:
        retrieved = [docs if window.query else [] for window, docs in zip(examples, retrieved)]
        logprobs = logprobs_from(method, examples, retrieved)
        return [{"nll": -float(scores.double().sum()), "tokens": len(window.target_ids), "bytes": window.n_bytes}
                for window, scores in zip(examples, logprobs)]

    def totals(self, stats: Sequence[dict[str, Any]]) -> dict[str, float]:
        return {key: sum(s[key] for s in stats) for key in ("nll", "tokens", "bytes")}

    def sample_log(self, window: Window, line: dict[str, Any]) -> dict[str, Any]:
        """Adds the first words of the window's scored text."""
        return {"id": line["id"], "text": window.text_start, **line}

    def aggregate(self, stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
        totals = self.totals(stats)
        return {"nats_per_token": nats_per_token(totals["nll"], totals["tokens"]),
                "ppl": perplexity(totals["nll"], totals["tokens"]),
                "bits_per_byte": bits_per_byte(totals["nll"], totals["bytes"])}

    @classmethod
    def metric_terms(cls, stats: dict[str, Any]) -> dict[str, tuple[float, float]]:
        """Nats per token is Σ nll / Σ tokens, bits per byte Σ (nll / ln 2) / Σ bytes."""
        return {"nats_per_token": (stats["nll"], stats["tokens"]),
                "bits_per_byte": (stats["nll"] / math.log(2), stats["bytes"])}

    def standard_errors(self, stats: Sequence[dict[str, Any]]) -> dict[str, float | None]:
        """The ratios' delta-method errors, and ppl · se(nats per token) for the perplexity."""
        errors = super().standard_errors(stats)
        totals = self.totals(stats)
        ppl = perplexity(totals["nll"], totals["tokens"])
        return {**errors, "ppl": perplexity_standard_error(ppl, errors["nats_per_token"])}


@hookimpl
def register_task_families(register):
    register(LanguageModelling)
