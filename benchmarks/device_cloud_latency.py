"""What DRAGON's device-cloud split costs: bytes, messages and wall time per token by RTT.

Scores the first few windows of a language-modelling task with `device-cloud` against one
cloud process (`raghub cloud serve`), for each mode x wire format x simulated round-trip time,
and prints a markdown table: bytes on the wire per token (both directions, and the
distributions alone), the distributions' compression ratio against full fp32, messages per
token, wall time per token (and after the first token, i.e. without the prefill), the cloud's
speculative acceptance rate, and bits per byte of the scored tokens.

    RAGHUB_DATA_DIR=... python benchmarks/device_cloud_latency.py --windows 2 --max-targets 32
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import secrets

import torch

from raghub.models import load_model
from raghub.cache import Cache, cache_root
from raghub.plugins.methods.device_cloud.method import DeviceCloud
from raghub.plugins.methods.device_cloud.server import AUTHKEY_VARIABLE, start_cloud
from raghub.retrieval import retrieve
from raghub.plugin_manager import default_host
from raghub.resolution import RunRequest, resolve

COLUMNS = [("mode", "mode"), ("wire", "compression"), ("RTT ms", "rtt_ms"),
           ("bytes/token", "bytes_per_token"), ("distribution bytes/token", "distribution_bytes_per_token"),
           ("compression ratio", "compression_ratio"), ("messages/token", "messages_per_token"),
           ("ms/token", "wall_ms_per_token"), ("ms/token after first", "ms_per_token_after_first"),
           ("cloud acceptance", "acceptance_rate_cloud"), ("bits/byte", "bits_per_byte")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="wikitext2")
    parser.add_argument("--datastore", default="heldout-articles", help="the task's datastore option")
    parser.add_argument("--retriever", default=None, help="default: the task's")
    parser.add_argument("--n-docs", type=int, default=4)
    parser.add_argument("--windows", type=int, default=2, help="windows scored per configuration")
    parser.add_argument("--max-targets", type=int, default=32, help="scored tokens kept per window")
    parser.add_argument("--rtt", type=float, nargs="+", default=[0.0, 20.0, 100.0], help="RTTs in ms")
    parser.add_argument("--bandwidth-mbps", type=float, default=0.0, help="0: unlimited")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of each process: one core per side, as two machines would")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    resolved = resolve(RunRequest(task=args.task, method="device-cloud", retriever=args.retriever,
                                  n_docs=args.n_docs, options={"datastore": args.datastore},
                                  data_dir=os.environ.get("RAGHUB_DATA_DIR")), default_host())
    cache = Cache(cache_root())
    model = load_model(None)
    task = resolved.task
    windows = [dataclasses.replace(w, target_ids=w.target_ids[:args.max_targets])
               for w in task.examples(model, args.windows)]
    retriever = resolved.retriever_class(cache, **resolved.plugin_options["retriever"])
    retrieved, _, _ = retrieve(task, retriever, windows, resolved.n_docs, cache)
    scored_bytes = sum(len(model.decode(w.target_ids).encode()) for w in windows)

    os.environ.setdefault(AUTHKEY_VARIABLE, secrets.token_hex(16))  # both sides read it
    cloud, address = start_cloud(["--threads", str(args.threads)])
    rows = []
    try:
        for mode in ("synchronised", "speculative"):
            for compression in ("none", "dragon"):
                for rtt in args.rtt:
                    method = DeviceCloud(model, cache, mode=mode, compression=compression, rtt_ms=rtt,
                                         bandwidth_mbps=args.bandwidth_mbps, cloud_address=address)
                    try:
                        logprobs = method.score_windows(windows, retrieved)
                        stats = method.run_stats()
                    finally:
                        method.close()
                    nats = -sum(float(lp.sum()) for lp in logprobs)
                    stats["bits_per_byte"] = nats / (math.log(2) * scored_bytes)
                    rows.append(stats)
                    print(f"done: {mode} {compression} rtt={rtt:g} ms", flush=True)
    finally:
        cloud.terminate()
        cloud.wait()

    print(f"\n{args.task} ({args.datastore}), {len(windows)} windows x <= {args.max_targets} "
          f"tokens, {args.n_docs} documents split device/cloud, model {model.name}, "
          f"bandwidth {'unlimited' if not args.bandwidth_mbps else f'{args.bandwidth_mbps:g} Mbit/s'}\n")
    print("| " + " | ".join(title for title, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for stats in rows:
        cells = [stats.get(key, "") for _, key in COLUMNS]
        print("| " + " | ".join(_cell(c) for c in cells) + " |")


def _cell(value) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


if __name__ == "__main__":
    main()
