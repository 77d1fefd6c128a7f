"""What the tests of methods that retrieve while they work share: a model that replies from a
script (no weights), a word-overlap retriever that counts its searches, and a two-question
multi-hop task over six passages, run in process through `raghub run`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from raghub import Generation, LanguageModel, ModelBackend, Retriever, hookimpl
from raghub.cli import cli

#: a token: a line end, or a word with the spaces before it
PIECE = re.compile(r"\n|[^\S\n]*\S+")
#: the log-prob of every token of a reply given as plain text
SURE = -0.1

# The six passages, in corpus order (positions 0-5), and the two questions they answer.
PASSAGES = {
    "Alpha Film": "Alpha Film is a 1990 drama directed by Bea Mann.",
    "Bea Mann": "Bea Mann is a German director born in Ulm.",
    "Ulm": "Ulm is a city on the Danube in Germany.",
    "Gamma River": "The Gamma River is 500 km long.",
    "Delta River": "The Delta River is 300 km long.",
    "Einstein": "Albert Einstein was born in Ulm in 1879.",
}
BRIDGE = "Where was the director of Alpha Film born?"
COMPARISON = "Which is longer, the Gamma River or the Delta River?"
ROWS = [
    {"_id": "q1", "question": BRIDGE, "answer": "Ulm", "type": "bridge",
     "context": [[title, [PASSAGES[title]]] for title in ("Alpha Film", "Bea Mann", "Ulm")],
     "supporting_facts": [["Alpha Film", 0], ["Bea Mann", 0]]},
    {"_id": "q2", "question": COMPARISON, "answer": "Gamma River", "type": "comparison",
     "context": [[title, [PASSAGES[title]]] for title in ("Gamma River", "Delta River", "Einstein")],
     "supporting_facts": [["Gamma River", 0], ["Delta River", 0]]},
]


def tail(prompt: str) -> str:
    """What a prompt holds after its last "Question: " (the question and the method's reply so far)."""
    return prompt.rsplit("Question: ", 1)[1]


def titles(prompt: str) -> list[str]:
    """The titles of the passages in a prompt, in order."""
    return re.findall(r"Passage \d+: (.+)", prompt)


class PieceTokenizer:
    """`PIECE`s as tokens, their ids handed out as they are met (0 ends the text)."""

    pad_token_id, eos_token = 0, "<end>"

    def __init__(self):
        self.pieces = ["<end>"]

    def __len__(self):
        return len(self.pieces)

    def id(self, piece: str) -> int:
        if piece not in self.pieces:
            self.pieces.append(piece)
        return self.pieces.index(piece)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.id(piece) for piece in PIECE.findall(text)]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids if i)


class ScriptedModel(LanguageModel):
    """Replies to each prompt with `reply(prompt)`: text (each token of log-prob `SURE`) or
    (token, log-prob) pairs; cut to max_new_tokens tokens, and by `generate_line` after its
    first line end that follows text. Remembers every prompt."""

    device, dtype = "cpu", "float32"

    def __init__(self, reply: Callable[[str], str | list[tuple[str, float]]]):
        super().__init__(PieceTokenizer(), "scripted", fingerprint="scripted-weights")
        self.reply = reply
        self.prompts: list[str] = []

    def sequence_logprobs(self, sequences, starts):
        raise NotImplementedError

    def generate(self, prompts, max_new_tokens):
        return [self.generation(prompt, max_new_tokens, one_line=False) for prompt in prompts]

    def generate_line(self, prompts, max_new_tokens):
        return [self.generation(prompt, max_new_tokens, one_line=True) for prompt in prompts]

    def generation(self, prompt: str, max_new_tokens: int, one_line: bool) -> Generation:
        self.prompts.append(prompt)
        reply = self.reply(prompt)
        tokens = [(piece, SURE) for piece in PIECE.findall(reply)] if isinstance(reply, str) else reply
        tokens = tokens[:max_new_tokens]
        if one_line:
            ends = [n for n, (piece, _) in enumerate(tokens) if piece == "\n" and "".join(p for p, _ in tokens[:n]).strip()]
            tokens = tokens[: ends[0] + 1] if ends else tokens
        return Generation("".join(piece for piece, _ in tokens), [lp for _, lp in tokens],
                          [self.tokenizer.id(piece) for piece, _ in tokens])


class ScriptedBackend(ModelBackend):
    """`--model scripted`: the test's `ScriptedModel`, counting the loads."""

    name = "scripted"
    model: ScriptedModel | None = None
    loads = 0

    @classmethod
    def handles(cls, spec):
        return spec == "scripted"

    def load(self, spec, device, dtype, batch_size):
        ScriptedBackend.loads += 1
        return ScriptedBackend.model


def words(text: str) -> set[str]:
    """The lower-case words of four letters or more."""
    return {word for word in re.findall(r"\w+", text.lower()) if len(word) >= 4}


class Overlap(Retriever):
    """Scores a passage by the words of four letters or more that it shares with the query;
    equal scores in corpus order. Keeps every query it is asked."""

    name = "overlap"
    asked: list[str] = []

    def index(self, passages, corpus_fingerprint):
        self.passage_words = [words(p.as_text()) for p in passages]

    def search(self, queries, k):
        Overlap.asked += queries
        ranked = [sorted(((p, float(len(words(q) & own))) for p, own in enumerate(self.passage_words)),
                         key=lambda pair: (-pair[1], pair[0]))[:k] for q in queries]
        return ranked


def write_task(folder: Path) -> Path:
    """The two-question task (its YAML and data under `folder`); returns the YAML's path."""
    (folder / "data" / "tiny").mkdir(parents=True)
    (folder / "data" / "tiny" / "tiny.json").write_text(json.dumps(ROWS))
    definition = folder / "tiny.yaml"
    definition.write_text("name: tiny\nfamily: qa\nprompt: completion\nmax_new_tokens: 16\n"
                          "few_shot:\n  - {question: \"Who wrote Hamlet?\", answer: William Shakespeare}\n"
                          "data: {folder: tiny, file: tiny.json, format: hotpotqa}\n")
    return definition


class ScriptedRuns:
    """`raghub run` of a method on the tiny task with the scripted model and the overlap
    retriever, in process; each run's record and samples-log lines."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.task = write_task(folder)

    def invoke(self, method: str, *args, results: str = "results"):
        return CliRunner().invoke(cli, ["run", "--task", str(self.task), "--data-dir", str(self.folder / "data"),
                                        "--method", method, "--model", "scripted", "--retriever", "overlap",
                                        "--json", "--results-dir", str(self.folder / results), *map(str, args)])

    def run(self, method: str, *args, results: str = "results") -> tuple[dict, list[dict]]:
        out = self.invoke(method, *args, results=results)
        assert out.exit_code == 0, (out.output, out.exception)
        record = json.loads(out.stdout)
        lines = (self.folder / results / record["samples"]).read_text().splitlines()
        return record, [json.loads(line) for line in lines]


class MethodPlugin:
    """Registers one method."""

    def __init__(self, method: type) -> None:
        self.method = method

    @hookimpl
    def register_methods(self, register):
        register(self.method)


@pytest.fixture
def scripted(tmp_path, monkeypatch, add_plugin):
    """Registers the scripted backend and the overlap retriever (and any methods given to
    `register`) for one test, with its own cache; yields a `ScriptedRuns`."""
    monkeypatch.setenv("RAGHUB_CACHE", str(tmp_path / "cache"))
    class Plugin:
        @hookimpl
        def register_models(self, register):
            register(ScriptedBackend)

        @hookimpl
        def register_retrievers(self, register):
            register(Overlap)

    add_plugin(Plugin())
    runs = ScriptedRuns(tmp_path)
    runs.register = lambda method: add_plugin(MethodPlugin(method))
    Overlap.asked, ScriptedBackend.loads = [], 0
    yield runs
    ScriptedBackend.model = None
