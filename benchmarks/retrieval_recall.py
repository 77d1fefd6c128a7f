"""Dense recall@k on a QA task's questions, untrained and with `raghub train` checkpoints (their
trained query encoder, and passage encoder when there is one), on the same questions.

    RAGHUB_DATA_DIR=../shared/data python benchmarks/retrieval_recall.py --task squad-heldout \
        --limit 1000 --checkpoint runs/lsr [--checkpoint ...] [--k 1 5 20]

Prints one JSON line per encoder: {"checkpoint", "questions", "recall@1", ...}.
"""

from __future__ import annotations

import argparse
import json
import os

from raghub.cache import Cache, cache_root
from raghub.metrics import mean
from raghub.plugin_manager import registry
from raghub.runner import retrieve


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
    for checkpoint in ["", *args.checkpoint]:
        retriever = found.retrievers["dense"](cache, checkpoint=checkpoint)
        retrieved, _, _ = retrieve(task, retriever, questions, max(args.k), cache)
        print(json.dumps({"checkpoint": checkpoint or "untrained", "questions": len(questions),
                          **{f"recall@{k}": round(mean(q.recall(docs[:k]) for q, docs in zip(questions, retrieved)), 4)
                             for k in args.k}}), flush=True)


if __name__ == "__main__":
    main()
