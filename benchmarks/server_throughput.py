"""Questions per second of SQuAD `incontext` through a llama.cpp server (the `openai` backend at
concurrency 1, 2 and 4) and in-process (the same GGUF dequantised, in bf16), side by side in one run.

    python -m llama_cpp.server --model "$(python benchmarks/server_throughput.py --gguf)" --port 8080 &
    RAGHUB_DATA_DIR=../shared/data python benchmarks/server_throughput.py --server http://127.0.0.1:8080/v1

Each way is one `raghub run` of the same questions, after an untimed one-question run that builds
the retrieval cache; questions/s is the questions over the run's own `duration_s` (the model's
load and the server's probe included). Prints the load average before and after: on a shared CPU
the numbers move with what else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from raghub.plugins.models.huggingface import embedded_gguf


def squad_incontext(results: Path, questions: int, model: list[str]) -> tuple[float, dict[str, str]]:
    """(the run's duration_s, each question's prediction) of one `raghub run`."""
    subprocess.run([sys.executable, "-m", "raghub", "run", "--task", "squad", "--method", "incontext",
                    "--limit", str(questions), "--results-dir", str(results), *model], check=True,
                   stdout=subprocess.DEVNULL)
    record = json.loads((results / "records.jsonl").read_text().splitlines()[-1])
    lines = (results / record["samples"]).read_text().splitlines()
    return record["duration_s"], {line["id"]: line["prediction"] for line in map(json.loads, lines)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", help="the llama.cpp server's /v1 URL, serving the embedded GGUF")
    parser.add_argument("--questions", type=int, default=10, help="SQuAD questions each way")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4], help="the server's")
    parser.add_argument("--gguf", action="store_true", help="print the embedded GGUF's path and exit")
    args = parser.parse_args(argv)
    if args.gguf:
        print(embedded_gguf())
        return
    if not args.server:
        parser.error("--server is required")
    served = ["--model", args.server, "--model-args", f"tokenizer={embedded_gguf()},prompt_as=text,logprobs_via=none"]
    print(f"load average at the start: {' '.join(map(str, os.getloadavg()))} ({os.cpu_count()} CPUs)")
    with tempfile.TemporaryDirectory() as scratch:
        squad_incontext(Path(scratch) / "warm-up", 1, ["--dtype", "bfloat16"])
        ways = [("in-process bf16", "-", ["--dtype", "bfloat16"])]
        ways += [("llama.cpp server", str(c), [*served[:-1], f"{served[-1]},concurrency={c}"]) for c in args.concurrency]
        rows, reference = [], None
        for number, (way, concurrency, model) in enumerate(ways):
            seconds, predictions = squad_incontext(Path(scratch) / str(number), args.questions, model)
            reference = reference or predictions
            same = sum(predictions[key] == reference[key] for key in reference)
            rows.append(f"| {way} | {concurrency} | {seconds:.1f} | {args.questions / seconds:.3f} | "
                        f"{same}/{len(reference)} |")
            print(rows[-1], flush=True)
    print(f"\n{args.questions} SQuAD questions, `incontext` (bm25, 4 passages)\n")
    print("| way | concurrency | seconds | questions/s | answers as in-process bf16 |\n|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nload average at the end: {' '.join(map(str, os.getloadavg()))}")


if __name__ == "__main__":
    main()
