"""`raghub train` throughput with 1 and 2 processes (torchrun, DDP on gloo): seconds per step
and examples per second, the median over the steps after the first (warm-up).

    RAGHUB_DATA_DIR=../shared/data python benchmarks/training_throughput.py \
        [--objective rag-sequence] [--steps 6] [--batch-size 4] [--n-docs 2] [--processes 1 2] [--bf16]

The defaults train the embedded SmolLM2-135M generator and all-MiniLM-L6-v2 on squad-train;
`--model` / `--encoder` take other folders. Each process runs one torch thread per core it gets
(OMP_NUM_THREADS = cores / processes, or --threads). Prints one JSON line per process count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="squad-train")
    parser.add_argument("--objective", default="rag-sequence")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--n-docs", type=int, default=2)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--model", default=None)
    parser.add_argument("--encoder", default=None)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / processes)")
    args = parser.parse_args()
    torchrun = Path(sys.executable).parent / "torchrun"
    cores = os.cpu_count() or 1
    for processes in args.processes:
        with tempfile.TemporaryDirectory() as output:
            command = [str(torchrun), "--nproc-per-node", str(processes), "-m", "raghub", "train",
                       "--task", args.task, "--objective", args.objective, "--output", output,
                       "--steps", str(args.steps), "--save-every", str(args.steps), "--batch-size", str(args.batch_size),
                       "--n-docs", str(args.n_docs), *(["--mixed-precision", "bf16"] if args.bf16 else []),
                       *(["--model", args.model] if args.model else []), *(["--encoder", args.encoder] if args.encoder else [])]
            threads = str(args.threads or max(1, cores // processes))
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "OMP_NUM_THREADS": threads})
            log = [json.loads(line) for line in (Path(output) / "train_log.jsonl").read_text().splitlines()]
        seconds = statistics.median(entry["seconds"] for entry in log[1:])
        print(json.dumps({"processes": processes, "threads_per_process": int(threads), "objective": args.objective,
                          "batch_size": args.batch_size, "n_docs": args.n_docs, "bf16": args.bf16,
                          "steps_timed": len(log) - 1, "seconds_per_step": round(seconds, 3),
                          "examples_per_s": round(args.batch_size / seconds, 3),
                          "machine": f"{platform.machine()} {platform.processor() or ''} {cores} cores".strip()}),
              flush=True)


if __name__ == "__main__":
    main()
