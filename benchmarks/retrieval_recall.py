"""Recall@k on a QA task's questions: of dense retrieval, untrained and with `raghub train`
checkpoints (their trained query encoder, and passage encoder when there is one); or of
retrieval pipelines (`--pipeline`: a retriever, `+`-joined retrievers fused by RRF, and
`>RERANKER`), on the same questions.

    RAGHUB_DATA_DIR=../shared/data python benchmarks/retrieval_recall.py --task squad-heldout \
        --limit 1000 --checkpoint runs/lsr [--checkpoint ...] [--k 1 5 20]
    python benchmarks/retrieval_recall.py --task hotpotqa --k 1 3 10 --pipeline bm25 \
        --pipeline dense --pipeline bm25+dense --pipeline '>lm' --pipeline '>embedding'

Prints one JSON line per encoder, {"checkpoint", "questions", "recall@1", ...}, or per pipeline,
{"pipeline", "questions", "recall@1", ..., "index_s", "seconds_per_query"} and a reranked one's
"rerank_seconds_per_query", its reranker's share (the times of this invocation: with `--fresh`
nothing cached is reused). A checkpoint's line adds, per k, its
paired difference from the untrained encoder on the same questions (mean, standard error of
the mean of the per-question differences, questions won and lost); a pipeline's, from the first
pipeline's. A pipeline that starts with '>' reranks the first pipeline's retrievers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

from raghub.cache import Cache, cache_root
from raghub.metrics import mean
from raghub.models import load_model
from raghub.plugin_manager import default_host
from raghub.retrieval import Retrieval, retrieve
from raghub.stages import Stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="squad-heldout")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--checkpoint", action="append", default=[])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--data-dir", default=os.environ.get("RAGHUB_DATA_DIR"))
    parser.add_argument("--pipeline", action="append", default=[],
                        help="RETRIEVER[+RETRIEVER...][>RERANKER]; '>RERANKER' alone reranks the first's retrievers")
    parser.add_argument("--rerank-depth", type=int, default=None, help="default: 4 x the largest --k")
    parser.add_argument("--model", default=None, help="the lm reranker's model (default: the embedded one)")
    parser.add_argument("--fresh", action="store_true", help="reuse nothing cached, so the times are the work's")
    args = parser.parse_args()
    found = default_host().registry
    definition = found.tasks[args.task]
    task = found.task_families[definition["family"]](args.task, definition, args.data_dir, registry=found)
    questions = task.examples(None, args.limit)
    cache = Cache(cache_root(), stale_before=time.time() if args.fresh else None)
    if args.pipeline:
        compare_pipelines(args, found, task, questions, cache)
        return
    untrained: dict[int, list[float]] = {}
    for checkpoint in ["", *args.checkpoint]:
        retriever = found.retrievers["dense"](cache, checkpoint=checkpoint)
        retrieved, _, _ = retrieve(task, retriever, questions, max(args.k), cache)
        recalls = {k: [q.recall(docs[:k]) for q, docs in zip(questions, retrieved)] for k in args.k}
        line = {"checkpoint": checkpoint or "untrained", "questions": len(questions),
                **{f"recall@{k}": round(mean(values), 4) for k, values in recalls.items()}}
        if checkpoint:
            line.update({f"delta@{k}": paired(untrained[k], recalls[k]) for k in args.k})
        else:
            untrained = recalls
        print(json.dumps(line), flush=True)


def compare_pipelines(args: argparse.Namespace, found, task, questions, cache: Cache) -> None:
    """One line per pipeline: recall@k, the seconds its indexes took and per query its search,
    and (after the first) its paired difference from the first pipeline."""
    first: dict[int, list[float]] = {}
    model = None
    for spec in args.pipeline:
        names, _, reranker_name = spec.partition(">")
        names = names or args.pipeline[0].partition(">")[0]
        if reranker_name == "lm" and model is None:
            model = load_model(args.model)
        parts = [found.retrievers[name](cache) for name in names.split("+")]
        reranker = found.rerankers[reranker_name](model, cache) if reranker_name else None
        retrieval = Retrieval(task, parts[0], cache, Stages(parts[1:], depth=args.rerank_depth, reranker=reranker))
        reranking = []  # seconds of each reranker call
        if reranker:  # its model loads here, outside the times
            reranker.score([questions[0].query], [[retrieval.passages[0]]])
            reranker.score = timed(reranker.score, reranking)
        clock = time.perf_counter()
        retrieval.open()
        indexed = time.perf_counter()
        retrieved = retrieval.first_stage(questions, max(args.k))
        searched = time.perf_counter()
        recalls = {k: [q.recall(docs[:k]) for q, docs in zip(questions, retrieved)] for k in args.k}
        line = {"pipeline": f"{names}>{reranker_name}" if reranker_name else names, "questions": len(questions),
                **{f"recall@{k}": round(mean(values), 4) for k, values in recalls.items()},
                "index_s": round(indexed - clock, 2), "seconds_per_query": round((searched - indexed) / len(questions), 4),
                **({"rerank_seconds_per_query": round(sum(reranking) / len(questions), 4)} if reranker else {})}
        if first:
            line.update({f"delta@{k}": paired(first[k], recalls[k]) for k in args.k})
        else:
            first = recalls
        print(json.dumps(line), flush=True)


def timed(function, seconds: list[float]):
    """`function`, adding the seconds each call takes to `seconds`."""
    def call(*args, **kwargs):
        clock = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - clock)
    return call


def paired(before: list[float], after: list[float]) -> dict[str, float]:
    """Mean per-question difference, its standard error, and the questions won and lost."""
    differences = [b - a for a, b in zip(before, after)]
    average = mean(differences)
    spread = math.sqrt(sum((d - average) ** 2 for d in differences) / max(1, len(differences) - 1))
    return {"mean": round(average, 4), "se": round(spread / math.sqrt(len(differences)), 4),
            "won": sum(d > 0 for d in differences), "lost": sum(d < 0 for d in differences)}


if __name__ == "__main__":
    main()
