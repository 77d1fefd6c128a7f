"""Dense recall@k on a QA task's questions, untrained and with `raghub train` checkpoints (their
trained query encoder, and passage encoder when there is one), on the same questions.

    RAGHUB_DATA_DIR=../shared/data python benchmarks/retrieval_recall.py --task squad-heldout \
        --limit 1000 --checkpoint runs/lsr [--checkpoint ...] [--k 1 5 20]

Prints one JSON line per encoder: {"checkpoint", "questions", "recall@1", ...}; a checkpoint's
line adds, per k, its paired difference from the untrained encoder on the same questions (mean,
standard error of the mean of the per-question differences, questions won and lost).
"""

from __future__ import annotations

import argparse
import json
import math
import os

from raghub.cache import Cache, cache_root
from raghub.metrics import mean
from raghub.plugin_manager import registry
from raghub.retrieval import retrieve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="squad-heldout")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--checkpoint", action="append", default=[])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--data-dir", default=os.environ.get("RAGHUB_DATA_DIR"))
    args = parser.parse_args()
    found = registry()
    definition = found.tasks[args.task]
    task = found.task_families[definition["family"]](args.task, definition, args.data_dir, registry=found)
    questions = task.examples(None, args.limit)
    cache = Cache(cache_root())
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


def paired(before: list[float], after: list[float]) -> dict[str, float]:
    """Mean per-question difference, its standard error, and the questions won and lost."""
    differences = [b - a for a, b in zip(before, after)]
    average = mean(differences)
    spread = math.sqrt(sum((d - average) ** 2 for d in differences) / max(1, len(differences) - 1))
    return {"mean": round(average, 4), "se": round(spread / math.sqrt(len(differences)), 4),
            "won": sum(d > 0 for d in differences), "lost": sum(d < 0 for d in differences)}


if __name__ == "__main__":
    main()
