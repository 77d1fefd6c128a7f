"""Each method's cost per question against `incontext`, side by side in one process on one loaded
model: model calls (prompts sent), generated tokens, retrieval calls and seconds.

    RAGHUB_DATA_DIR=../shared/data python benchmarks/method_cost.py --task hotpotqa --limit 20 \
        --methods incontext,flare,ircot,iter-retgen,adaptive,self-ask,react,incontext

Runs the methods in the order given on the same first `--limit` questions (bm25, `--n-docs`
passages per call), each with an empty cache so that nothing computed by an earlier method is
reused; list `incontext` first and last to see how far the machine's speed drifted during the
run. Prints one JSON line per method: questions, EM, seconds per question (the run's wall time,
retrieval included, model loading not), prompts the model was sent per question (a batched call
counts each of its prompts), model calls per question (batched calls), generated tokens per
question (every method's, `incontext`'s included), retrieval calls per question
(the record's `method_stats`, plus the first stage), and the ratio of seconds to the
first `incontext`'s.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

from raghub.cache import Cache
from raghub.models import load_model
from raghub.plugin_manager import default_host
from raghub.resolution import resolve_sweep
from raghub.runner import execute

#: the model's entry points a method reaches; each counts once per call and once per prompt
MODEL_CALLS = ("generate", "generate_line", "sequence_logprobs", "continuation_logprobs", "answer_scores")
#: the entry points that generate, whose returned tokens count as generated
GENERATING = ("generate", "generate_line")
#: the step bound of each iterative method, as the committed leaderboard ran them
METHOD_SETTINGS = {"flare": {"max_steps": 3}, "ircot": {"max_steps": 3}, "self-ask": {"max_steps": 3},
                   "react": {"max_steps": 3}, "iter-retgen": {"iterations": 2}}


def count_calls(model, counts: Counter) -> None:
    """Wrap the model's entry points so that `counts` holds the calls, prompts and generated
    tokens that reach them from outside (an entry point calling another counts once)."""
    depth = [0]

    def counted(name, function):
        @functools.wraps(function)
        def wrapper(prompts, *args, **kwargs):
            if depth[0] == 0:
                counts["calls"] += 1
                counts["prompts"] += len(prompts)
            depth[0] += 1
            try:
                result = function(prompts, *args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0] == 0 and name in GENERATING:
                counts["generated_tokens"] += sum(len(generation.token_logprobs) for generation in result)
            return result
        return wrapper

    for name in MODEL_CALLS:
        setattr(model, name, counted(name, getattr(model, name)))


def cost_row(method: str, args, model, counts: Counter, results_dir: Path) -> dict:
    """Run `method` once, with an empty cache, and its cost per question."""
    settings = {"task": args.task, "method": method, "retriever": args.retriever, "n_docs": args.n_docs,
                "limit": args.limit, "dtype": args.dtype, "results_dir": str(results_dir),
                **METHOD_SETTINGS.get(method, {})}
    (resolved,) = resolve_sweep(settings, default_host())
    counts.clear()
    with tempfile.TemporaryDirectory() as cache_dir:
        record = execute(resolved, model, Cache(Path(cache_dir)))
    n = record.n_examples
    stats = record.method_stats
    return {"method": method, "questions": n, "em": record.metrics["em"],
            "seconds_per_question": round(record.duration_s / n, 3),
            "model_calls_per_question": counts["calls"] / n, "prompts_per_question": counts["prompts"] / n,
            "generated_tokens_per_question": counts["generated_tokens"] / n,
            "retrieval_calls_per_question": stats.get("retrieval_calls_per_example", 0.0)
            + (1.0 if resolved.method_class.first_stage and resolved.retriever_class else 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="hotpotqa")
    parser.add_argument("--methods", default="incontext,flare,ircot,iter-retgen,adaptive,self-ask,react,incontext")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--retriever", default="bm25")
    parser.add_argument("--n-docs", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    model = load_model(None, dtype=args.dtype)
    counts: Counter = Counter()
    count_calls(model, counts)
    print(json.dumps({"machine": f"{os.cpu_count()} CPUs", "load_average": os.getloadavg()}))
    baseline = None
    with tempfile.TemporaryDirectory() as results_dir:
        for method in args.methods.split(","):
            row = cost_row(method, args, model, counts, Path(results_dir))
            baseline = baseline or (row["seconds_per_question"] if method == "incontext" else None)
            row["seconds_vs_incontext"] = round(row["seconds_per_question"] / baseline, 2) if baseline else None
            print(json.dumps(row), flush=True)
    print(json.dumps({"load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
