"""Time the two BM25 backends, `bm25` (bm25s) and `bm25-rank` (rank-bm25), on real corpora.

    RAGHUB_DATA_DIR=../shared/data python benchmarks/bm25_backends.py [--queries 300] [--repeats 3]

Corpora: WikiText-2's test split cut into 64-word passages, queried with 96-word spans of the
same text (about the 128-token window contexts the language-modelling task sends); SQuAD v1.1
dev paragraphs, queried with its questions. For each backend: index build into an empty cache
(tokenising, indexing, saving), load of that cached index, and top-10 search throughput, each
the median of --repeats runs; the ratio column is bm25-rank's time over bm25's. The last column
checks that both return the same top-10 passages.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table

from raghub.cache import Cache
from raghub import Passage
from raghub.plugins.retrievers.bm25 import BM25S, RankBM25

PASSAGE_WORDS = 64
QUERY_WORDS = 96
WIKITEXT_TEST = Path("wikitext") / "wikitext-2-raw-v1.test.nonempty-lines.crlf.raw"
SQUAD_DEV = Path("squad") / "dev-v1.1.rebuilt-from-explorer-html.json"
STEPS = {"build": "index build", "load": "cached load", "search": "search"}


def wikitext_corpus(data_dir: Path, n_queries: int) -> tuple[list[Passage], list[str]]:
    """64-word passages of the WikiText-2 test text, and evenly spaced 96-word query spans."""
    words = (data_dir / WIKITEXT_TEST).read_text(encoding="utf-8").split()
    passages = [
        Passage(id=str(start), text=" ".join(words[start:start + PASSAGE_WORDS]))
        for start in range(0, len(words), PASSAGE_WORDS)
    ]
    step = (len(words) - QUERY_WORDS) // n_queries
    queries = [" ".join(words[start:start + QUERY_WORDS]) for start in range(0, step * n_queries, step)]
    return passages, queries


def squad_corpus(data_dir: Path, n_queries: int) -> tuple[list[Passage], list[str]]:
    """SQuAD dev paragraphs, and evenly spaced questions."""
    articles = json.loads((data_dir / SQUAD_DEV).read_text(encoding="utf-8"))["data"]
    passages = [
        Passage(id=f"{article['title']}-{number}", text=paragraph["context"], title=article["title"])
        for article in articles
        for number, paragraph in enumerate(article["paragraphs"])
    ]
    questions = [qa["question"] for article in articles for p in article["paragraphs"] for qa in p["qas"]]
    return passages, questions[:: max(1, len(questions) // n_queries)][:n_queries]


def median_seconds(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(backend, passages: list[Passage], queries: list[str], repeats: int) -> dict:
    """Build, cached-load and search times of one backend, and its rankings."""
    with tempfile.TemporaryDirectory() as root:
        def build_fresh() -> None:
            backend(Cache(tempfile.mkdtemp(dir=root))).index(passages, "benchmark")

        build = median_seconds(build_fresh, repeats)
        cache = Cache(root)
        retriever = backend(cache)
        retriever.index(passages, "benchmark")
        load = median_seconds(lambda: backend(cache).index(passages, "benchmark"), repeats)
        search = median_seconds(lambda: retriever.search(queries, 10), repeats)
        rankings = [[position for position, _ in ranked] for ranked in retriever.search(queries, 10)]
    return {"build": build, "load": load, "search": search, "rankings": rankings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("RAGHUB_DATA_DIR"),
                        help="the data directory (default: $RAGHUB_DATA_DIR)")
    parser.add_argument("--queries", type=int, default=300, help="queries per corpus")
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing (median)")
    args = parser.parse_args()
    if not args.data_dir:
        sys.exit("set RAGHUB_DATA_DIR or pass --data-dir (the folder holding wikitext/ and squad/)")

    console = Console()
    table = Table(title=f"BM25 backends, top-10 search, median of {args.repeats} runs; ratio = bm25-rank / bm25")
    for column in ("corpus", "step", "bm25 (bm25s)", "bm25-rank", "ratio"):
        table.add_column(column, justify="left" if column in ("corpus", "step") else "right")
    agreement = []
    for corpus_name, load_corpus in (("WikiText-2 test", wikitext_corpus),
                                     ("SQuAD v1.1 dev", squad_corpus)):
        passages, queries = load_corpus(Path(args.data_dir), args.queries)
        label = f"{corpus_name}\n{len(passages)} passages\n{len(queries)} queries"
        console.print(f"timing {corpus_name}: {len(passages)} passages, {len(queries)} queries")
        fast, reference = (measure(backend, passages, queries, args.repeats) for backend in (BM25S, RankBM25))
        for step in ("build", "load", "search"):
            table.add_row(label if step == "build" else "", STEPS[step], f"{fast[step]:.3f} s",
                          f"{reference[step]:.3f} s", f"{reference[step] / fast[step]:.1f}x")
        table.add_row("", "queries/s", f"{len(queries) / fast['search']:.0f}",
                      f"{len(queries) / reference['search']:.0f}", "", end_section=True)
        same = sum(a == b for a, b in zip(fast["rankings"], reference["rankings"]))
        agreement.append(f"{corpus_name}: same top-10 for {same}/{len(queries)} queries")
    table.caption = "; ".join(agreement)
    console.print(table)


if __name__ == "__main__":
    main()
