"""Time `ensemble` (all K passages of every window in one batched call) against a Python loop
that scores one (window, passage) pair at a time, on the same WikiText-2 windows.

    RAGHUB_DATA_DIR=../shared/data python benchmarks/ensemble_batching.py --windows 2 --k 2 4 10

Prints one row per K: seconds for each way, the loop / batched ratio, and the largest
difference between their mixed log-probs (they compute the same thing).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from raghub import Retrieved, mixture_logprobs, passage_ids, score_after_prefixes
from raghub.models import load_model
from raghub.cache import Cache, cache_root
from raghub.plugins.methods.ensemble import Ensemble
from raghub.plugins.tasks.language_modelling import LanguageModelling
from raghub.settings import read_task_definition

TASK_FILE = Path(__file__).resolve().parents[1] / "tasks" / "wikitext2.yaml"


def per_passage_loop(model, windows, retrieved):
    """The unbatched baseline: one forward pass per (window, passage), then the same mixture."""
    mixed = []
    for window, docs in zip(windows, retrieved):
        doc_logprobs = [score_after_prefixes(model, [window],
                                             [passage_ids(model, r.passage, window.retrieved_max_length)])[0]
                        for r in docs]
        mixed.append(mixture_logprobs(torch.stack(doc_logprobs), torch.tensor([r.score for r in docs])))
    return mixed


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=2, help="windows to score (after the first)")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 10], help="passages per window")
    parser.add_argument("--batch-size", type=int, default=16, help="the model's scoring batch size")
    args = parser.parse_args()

    model = load_model(None, batch_size=args.batch_size)
    task = LanguageModelling("wikitext2", read_task_definition(TASK_FILE),
                             os.environ.get("RAGHUB_DATA_DIR"), datastore="heldout-articles")
    windows = task.examples(model, args.windows + 1)[1:]  # the first window retrieves nothing
    passages, _ = task.corpus()
    ensemble = Ensemble(model, Cache(cache_root()))
    print(f"{len(windows)} windows of {len(windows[0].target_ids)} target tokens, "
          f"{torch.get_num_threads()} threads, batch size {args.batch_size}")
    print("| K | batched s | per-passage loop s | loop / batched | max |diff| |")
    print("|---|---|---|---|---|")
    for k in args.k:
        # which passages does not change the cost: take k from other articles, best first
        retrieved = [[Retrieved(p, float(k - rank)) for rank, p in
                      enumerate([p for p in passages if p.group != w.exclude_group][:k])]
                     for w in windows]
        batched_s, batched = timed(ensemble.score_windows, windows, retrieved)
        loop_s, looped = timed(per_passage_loop, model, windows, retrieved)
        difference = max(float((a - b).abs().max()) for a, b in zip(batched, looped))
        print(f"| {k} | {batched_s:.1f} | {loop_s:.1f} | {loop_s / batched_s:.2f} | {difference:.1e} |")


if __name__ == "__main__":
    main()
