"""Nothing silently wrong, nothing lost: torn records, racing cache builds, no pickle in the
cache, and WikiText article titles."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import time
from itertools import groupby
from pathlib import Path

import pytest

from raghub import Passage
from raghub.cache import MANIFEST, Cache, file_sha256
from raghub.plugins.retrievers.bm25 import RankBM25
from raghub.plugins.tasks.language_modelling import article_of_lines, read_rows, text_lines
from raghub.record import Record
from raghub.records import RECORDS_FILE, append_record, read_records

WIKITEXT = Path(os.environ["RAGHUB_DATA_DIR"]) / "wikitext"
WIKITEXT2_TEST_FILES = ["wikitext-2-raw-v1.test.rows.jsonl", "wikitext-2-raw-v1.test.nonempty-lines.crlf.raw",
                        "wikitext-2-raw-v1.test.hf-rows-joined.crlf.txt"]


# --------------------------------------------------------------------------- records


def test_a_torn_last_line_loses_no_record_and_is_named_on_stderr(tmp_path, capsys):
    first, lost, next_one = (Record(id=name, task="t", method=name, n_examples=1, metrics={})
                             for name in ("first", "lost", "next"))
    path = tmp_path / RECORDS_FILE
    path.write_text(json.dumps(first.to_dict()) + "\n" + json.dumps(lost.to_dict())[:12])  # a writer died mid-line
    append_record(tmp_path, next_one)
    assert read_records(tmp_path) == [first, next_one]
    assert f"{path}, line 2" in capsys.readouterr().err


# --------------------------------------------------------------------------- cache


def build_the_same_entries(root: str, rounds: int, barrier, results) -> None:
    """Build entries 0 .. rounds-1 in step with another process; report what was loaded."""
    cache = Cache(root)

    def build(folder: Path) -> None:
        time.sleep(0.02)
        (folder / "value.txt").write_text(f"built by {os.getpid()}")

    loaded = []
    for entry in range(rounds):
        barrier.wait()
        try:
            loaded.append(cache.get_or_build("race", entry, build, lambda f: (f / "value.txt").read_text()))
        except Exception as error:  # reported, so the test shows what went wrong
            loaded.append(repr(error))
    results.put(loaded)


def test_two_processes_building_the_same_entry_both_succeed_with_one_content(tmp_path):
    rounds, context = 40, multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=build_the_same_entries, args=(str(tmp_path), rounds, barrier, results))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    first, second = results.get(timeout=30), results.get(timeout=30)
    for worker in workers:
        worker.join()
    assert all(value.startswith("built by ") for value in first + second), first + second
    assert first == second
    assert sorted(path.name for path in (tmp_path / "race").iterdir()) == sorted(
        Cache(tmp_path).entry_path("race", entry).name for entry in range(rounds))


def test_orphaned_partial_builds_are_removed_and_live_ones_kept(tmp_path):
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()  # its PID is now free: no process of that PID is alive
    kind = tmp_path / "things"
    orphan, live = kind / f"abc.partial-{exited.pid}", kind / f"def.partial-{os.getpid()}"
    for folder in (orphan, live):
        folder.mkdir(parents=True)
        (folder / "half.txt").write_text("half")
    assert Cache(tmp_path).json("things", "key", lambda: 1) == 1
    assert not orphan.exists() and (live / "half.txt").exists()


def test_an_entry_stored_under_another_key_is_refused_and_recomputed(tmp_path):
    """Regression: swapping two `retrievals` entries made a --n-docs 2 run read the --n-docs 4
    entry: an entry is used only when its manifest's key is the key asked for."""
    cache = Cache(tmp_path)
    two, four = ({"queries": "q", "k": k} for k in (2, 4))
    for key in (two, four):
        cache.json("retrievals", key, lambda key=key: list(range(key["k"])))
    first, second = cache.entry_path("retrievals", two), cache.entry_path("retrievals", four)
    first.rename(tmp_path / "aside")
    second.rename(first)
    (tmp_path / "aside").rename(second)
    computed = []
    assert cache.json("retrievals", two, lambda: computed.append(2) or [0, 1]) == [0, 1]
    assert computed == [2]
    assert json.loads((first / MANIFEST).read_text())["key"] == two


def test_an_entry_of_a_scoped_cache_is_served_again(tmp_path):
    """Regression: the key check compared the stored key alone with the folder's name, which a
    scoped cache (keyed by a plugin's code too) derives from key and scope, so every entry of
    every plugin was computed again on every run."""
    cache = Cache(tmp_path).scoped({"source": "abc"})
    computed = []
    for _ in range(2):
        assert cache.json("retrievals", {"k": 2}, lambda: computed.append(1) or [0, 1]) == [0, 1]
    assert computed == [1]
    assert Cache(tmp_path).scoped({"source": "other"}).json("retrievals", {"k": 2}, lambda: [5]) == [5]


# --------------------------------------------------------------------------- no pickle


class Plant:
    """A pickle that, when loaded, creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_the_bm25_rank_index_is_stored_without_pickle_and_never_unpickled(tmp_path):
    cache, texts = Cache(tmp_path / "cache"), ["apple banana", "apple cherry cherry", "date"]
    corpus = [Passage(id=str(i), text=text) for i, text in enumerate(texts)]
    RankBM25(cache).index(corpus, "toy")
    [entry] = (cache.root / "bm25-index").iterdir()
    assert not [path.name for path in entry.iterdir() if path.suffix in (".pkl", ".pickle")]

    # someone who can write the cache plants a pickle and lists it in the manifest
    marker = tmp_path / "code-ran"
    for name in ("bm25okapi.pkl", "index.pkl"):
        (entry / name).write_bytes(pickle.dumps(Plant(marker)))
    manifest = json.loads((entry / MANIFEST).read_text())
    manifest["files"] = {path.name: file_sha256(path) for path in entry.iterdir() if path.name != MANIFEST}
    (entry / MANIFEST).write_text(json.dumps(manifest))

    retriever = RankBM25(cache)
    retriever.index(corpus, "toy")
    assert not marker.exists()
    assert retriever.search(["cherry"], 1)[0][0][0] == 1


# --------------------------------------------------------------------------- WikiText articles


def test_formula_fragments_between_equals_signs_are_not_article_titles():
    lines = [" = Alpha = ", " Alpha has a cut @-@ off frequency of ωc ", " = 1 rad / s and an impedance k = ",
             " 1 Ω . It is produced by an inductance L ", " = 1 henry and capacitance C = ", " 1 farad . ",
             " = = Section = = ", " Text . ", " = Beta = ", " Beta follows . "]
    assert article_of_lines(lines) == ["Alpha"] * 8 + ["Beta"] * 2


def title_rows_between_blank_rows(rows: list[str]) -> list[str]:
    """The titles of the ` = Title = ` rows that stand alone between blank rows: how the hub's
    row layout marks an article."""
    return [row.strip(" =\n") for before, row, after in zip(rows, rows[1:], rows[2:])
            if not before and not after and row.startswith(" = ") and not row.startswith(" = = ")]


@pytest.mark.parametrize("name", WIKITEXT2_TEST_FILES)
def test_the_wikitext2_test_split_has_its_60_articles_in_every_format(name):
    hub_rows = WIKITEXT / WIKITEXT2_TEST_FILES[0]
    if not (WIKITEXT / name).is_file() or not hub_rows.is_file():
        pytest.skip(f"needs {WIKITEXT / name} and {hub_rows}")
    articles = article_of_lines(text_lines(read_rows(WIKITEXT / name)))
    titles = [title for title, _ in groupby(articles)]
    assert titles == title_rows_between_blank_rows(read_rows(hub_rows))
    assert len(titles) == len(set(titles)) == 60
    assert titles[titles.index("Constant k filter") + 1] == "The Snowmen"  # one group, not three
