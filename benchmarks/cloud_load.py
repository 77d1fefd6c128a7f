"""The device-cloud server under hostile clients: honest devices served while others misbehave.

Starts one real `raghub cloud serve` (the embedded model, one torch thread) on loopback and
runs two phases of the same honest load, without and with hostile clients: N honest devices,
each asking R requests of S tokens over two documents of random token ids, concurrently. In the
second phase K hostile clients run the whole time, in three kinds, each reconnecting whenever
the cloud drops it: half-handshakes (half of the answer to the challenge, then silence), silent
mid-request (authenticated, a request opened, then no verdict), and garbage (random bytes
instead of the handshake, or an authenticated frame that is not a message). Prints, per phase,
the requests served per second, the median and p95 request latency, the honest requests that
failed (should be 0) and the hostile connections made. A robustness figure, not a speed one:
it runs on loopback only, bounded in count and in time (`--time-limit-s`).

    python benchmarks/cloud_load.py --devices 4 --requests 5 --hostile 6
"""

from __future__ import annotations

import argparse
import math
import os
import random
import secrets
import socket
import statistics
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Client

import numpy as np

from raghub.plugins.methods.device_cloud.server import AUTHKEY_VARIABLE, start_cloud
from raghub.plugins.methods.device_cloud.wire import Channel, PeerLost, flatten_prompts

HOSTILE_KINDS = ("half-handshake", "silent mid-request", "garbage")


class Load:
    """One cloud's address and secret, and a deadline every client stops at."""

    def __init__(self, address: str, secret: bytes, deadline: float):
        host, _, port = address.rpartition(":")
        self.address = (host, int(port))
        self.secret = secret
        self.deadline = deadline
        self.vocabulary = 0

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def device(self) -> Channel:
        """An authenticated device that said hello."""
        pool = ThreadPoolExecutor(1)  # Client() itself has no timeout
        try:
            connection = pool.submit(Client, self.address, authkey=self.secret).result(timeout=self.left())
        finally:
            pool.shutdown(wait=False)
        channel = Channel(connection, timeout_s=max(self.left(), 0.1))
        channel.send({"kind": "hello", "rtt_ms": 0.0, "bandwidth_mbps": 0.0})
        self.vocabulary = channel.receive().fields["vocab_size"]
        return channel

    def open(self, channel: Channel, steps: int, rng: random.Random) -> None:
        documents = [[rng.randrange(self.vocabulary) for _ in range(32)] for _ in range(2)]
        channel.send({"kind": "open", "request": 1, "steps": steps, "mode": "synchronised",
                      "compression": "dragon", "temperature": 1.0},
                     {"closed_book_ids": np.array(documents[0][:4], dtype=np.int32),
                      **flatten_prompts(documents), "scores": np.array([1.0, 0.5], dtype=np.float32)})


def honest_device(load: Load, requests: int, steps: int, seed: int, latencies: list, failures: list) -> None:
    """`requests` requests in a row, each agreeing to the cloud's draft at every step."""
    rng = random.Random(seed)
    try:
        channel = load.device()
    except Exception as error:  # counted, not raised: the figure says what failed
        failures.extend([f"{type(error).__name__}: {error}"] * requests)
        return
    try:
        for _ in range(requests):
            started = time.monotonic()
            try:
                load.open(channel, steps, rng)
                for step in range(steps):
                    draft = channel.receive().fields["draft"]
                    channel.send({"kind": "verdict", "request": 1, "step": step, "token": draft,
                                  "done": step == steps - 1})
            except Exception as error:
                failures.append(f"{type(error).__name__}: {error}")
                return
            latencies.append(time.monotonic() - started)
    finally:
        channel.close()


def _until_dropped(sock: socket.socket, load: Load) -> None:
    """Read and drop what the cloud sends until it hangs up or the load ends."""
    while load.left() > 0:
        sock.settimeout(min(load.left(), 1.0))
        try:
            if not sock.recv(4096):
                return
        except TimeoutError:
            continue
        except OSError:
            return


def hostile_client(kind: str, load: Load, stop: threading.Event, made: list) -> None:
    """Misbehave as `kind`, again each time the cloud drops the connection, until `stop`."""
    rng, attempts = random.Random(kind), 0
    while not stop.is_set() and load.left() > 0:
        attempts += 1
        made.append(kind)
        authenticated = kind == "silent mid-request" or (kind == "garbage" and attempts % 2 == 0)
        if authenticated:
            try:
                channel = load.device()
            except (PeerLost, OSError, EOFError):
                continue
            try:
                if kind == "garbage":
                    channel.connection.send_bytes(rng.randbytes(64))
                else:
                    load.open(channel, 8, rng)
                    channel.receive()
                while not stop.is_set() and load.left() > 0:  # silent until the cloud hangs up
                    if channel.connection.poll(0.5):
                        channel.connection.recv_bytes()
            except (PeerLost, OSError, EOFError):
                pass
            finally:
                channel.close()
        else:
            with socket.create_connection(load.address, timeout=max(load.left(), 0.1)) as sock:
                sock.sendall(struct.Struct("!i").pack(20) + b"x" * 10 if kind == "half-handshake"
                             else rng.randbytes(64))
                _until_dropped(sock, load)
        if kind == "garbage":
            stop.wait(0.05)  # a steady stream, not a flood


def run_phase(load: Load, devices: int, requests: int, steps: int, hostile: int) -> dict:
    latencies: list[float] = []
    failures: list[str] = []
    made: list[str] = []
    stop = threading.Event()
    attackers = [threading.Thread(target=hostile_client, args=(HOSTILE_KINDS[i % 3], load, stop, made),
                                  daemon=True) for i in range(hostile)]
    for attacker in attackers:
        attacker.start()
    time.sleep(1.0 if hostile else 0.0)  # the hostile clients are in place first
    started = time.monotonic()
    honest = [threading.Thread(target=honest_device, args=(load, requests, steps, i, latencies, failures))
              for i in range(devices)]
    for thread in honest:
        thread.start()
    for thread in honest:
        thread.join(timeout=load.left())
    elapsed = time.monotonic() - started
    stop.set()
    for attacker in attackers:
        attacker.join(timeout=load.left())
    latencies.sort()
    return {"hostile": hostile, "served": len(latencies), "asked": devices * requests,
            "failed": failures, "per_s": len(latencies) / elapsed,
            "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
            "p95_ms": 1000 * latencies[math.ceil(0.95 * len(latencies)) - 1] if latencies else float("nan"),
            "hostile_connections": {kind: made.count(kind) for kind in HOSTILE_KINDS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=4, help="honest devices, concurrent")
    parser.add_argument("--requests", type=int, default=5, help="requests per honest device")
    parser.add_argument("--steps", type=int, default=8, help="tokens per request")
    parser.add_argument("--hostile", type=int, default=6, help="hostile clients in the second phase")
    parser.add_argument("--time-limit-s", type=float, default=300.0, help="the whole run's bound")
    args = parser.parse_args()

    secret = secrets.token_hex(16)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"{os.cpu_count()} CPUs", flush=True)
    process, address = start_cloud(["--threads", "1"], environment={AUTHKEY_VARIABLE: secret})
    try:
        load = Load(address, secret.encode(), time.monotonic() + args.time_limit_s)
        phases = [run_phase(load, args.devices, args.requests, args.steps, hostile)
                  for hostile in (0, args.hostile)]
    finally:
        process.terminate()
        process.wait(timeout=30)
        process.stdout.close()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\n{args.devices} honest devices x {args.requests} requests x {args.steps} tokens\n")
    print("| hostile clients | served / asked | honest failures | requests/s | p50 ms | p95 ms "
          "| hostile connections made |")
    print("|---|---|---|---|---|---|---|")
    for phase in phases:
        made = ", ".join(f"{kind} {count}" for kind, count in phase["hostile_connections"].items() if count)
        print(f"| {phase['hostile']} | {phase['served']} / {phase['asked']} | {len(phase['failed'])} "
              f"| {phase['per_s']:.2f} | {phase['p50_ms']:.0f} | {phase['p95_ms']:.0f} | {made or '–'} |")
    for phase in phases:
        for failure in phase["failed"]:
            print(f"failed (hostile {phase['hostile']}): {failure}")


if __name__ == "__main__":
    main()
