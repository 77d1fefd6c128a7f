"""The device side of device-cloud: the method, which reads its own documents, exchanges
distributions with the cloud and aggregates them per token."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import asdict, replace
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from raghub import Cache, LanguageModel, Method, Option, Passage, Retrieved, UsageError, passage_ids

from .mixing import combine_sides, deal_alternately, resolve_draft
from .server import AUTHKEY_VARIABLE, SIDE_REQUIRES, CloudLost, start_cloud
from .wire import (COMPRESSIONS, MODES, TOKEN_OFFSET, BadMessage, Channel, Message, PeerLost, WireCounters,
                   flatten_prompts, unpack_distribution)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .sides import DocumentSide


def _lost(error: PeerLost) -> CloudLost:
    return CloudLost(f"device-cloud lost the cloud mid-run: {error}; restart it and rerun "
                     "(finished examples are kept)")


def address_problem(address: str) -> str | None:
    """What is wrong with a `HOST:PORT` address, or None."""
    port = address.rpartition(":")[2]
    if not port.isdecimal() or not 1 <= int(port) <= 65535:
        return f"must be HOST:PORT with a port from 1 to 65535, not {address!r}"
    return None


def split_address(address: str, flag: str = "--cloud-address") -> tuple[str, int]:
    """(host, port) of `HOST:PORT` (no host: 127.0.0.1); a UsageError naming `flag` otherwise."""
    problem = address_problem(address)
    if problem:
        raise UsageError(f"{flag} {problem}")
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", int(port)


class DeviceCloud(Method):
    name = "device-cloud"
    description = ("DRAGON: device and cloud processes each mix their own documents' "
                   "distributions; the device aggregates them per token")
    needs_retrieval = True
    families = frozenset({"language-modelling", "qa"})
    requires = SIDE_REQUIRES
    options = {
        "mode": Option(MODES, "synchronised", "synchronised: one round trip per token; "
                       "speculative: each side drafts ahead and rolls back on rejection"),
        "compression": Option(COMPRESSIONS, "dragon", "wire format of each distribution: dragon "
                              "(top-p 0.8, int16 ids, fp16 log-probs, lz4) or none (full fp32)"),
        "temperature": Option(float, 1.0, "retrieval-score temperature T of the mixture weights", above=0),
        "cloud_address": Option(str, "", "host:port of a running `raghub cloud serve`, whose secret "
                                f"is in {AUTHKEY_VARIABLE} (default: start one for this run)",
                                check=address_problem),
        "cloud_corpus": Option(str, "", "passages the spawned cloud retrieves from itself (.jsonl "
                               "or blank-line-separated text); default: split the run's ranked list"),
        "cloud_retriever": Option(str, "bm25", "retriever the spawned cloud uses over --cloud-corpus"),
        "rtt_ms": Option(float, 0.0, "simulated network round-trip time in milliseconds", at_least=0),
        "bandwidth_mbps": Option(float, 0.0, "simulated bandwidth in Mbit/s (0: unlimited)", at_least=0),
        "timeout_s": Option(float, 120.0, "seconds to wait for the cloud before giving up", above=0),
    }

    def __init__(self, model: LanguageModel, cache: Cache, **options: Any):
        import torch

        super().__init__(model, cache, **options)
        if self.settings["cloud_address"] and self.settings["cloud_corpus"]:
            raise UsageError("--cloud-corpus is for a cloud this run starts; give the corpus to "
                             "`raghub cloud serve --corpus` when using --cloud-address")
        if self.settings["cloud_address"] and not os.environ.get(AUTHKEY_VARIABLE):
            raise UsageError(f"--cloud-address needs the cloud's secret: set {AUTHKEY_VARIABLE} to "
                             "the one `raghub cloud serve` printed or was given")
        if len(model.tokenizer) > 2 * TOKEN_OFFSET:
            raise UsageError(f"device-cloud's int16 token ids fit vocabularies up to {2 * TOKEN_OFFSET} "
                             f"tokens; this model has {len(model.tokenizer)}")
        self.cloud_process: subprocess.Popen | None = None
        self.channel: Channel | None = None
        self.cloud_has_corpus = False
        self.requests = 0  #: the id of the last request on this connection
        self.generator = torch.Generator().manual_seed(0)

    # connection ---------------------------------------------------------------------------

    def _connect(self) -> Channel:
        if self.channel is not None:
            return self.channel
        address = self.settings["cloud_address"] or self._spawn_cloud()
        host_port = split_address(address)
        authkey = (self._spawned_authkey if self.cloud_process is not None
                   else os.environ[AUTHKEY_VARIABLE].encode())
        pool = ThreadPoolExecutor(1)  # Client() itself has no timeout
        future = pool.submit(Client, host_port, authkey=authkey)
        try:
            connection = future.result(timeout=self.settings["timeout_s"])
        except FutureTimeout:
            raise CloudLost(f"the cloud at {address} did not accept the connection within "
                            f"{self.settings['timeout_s']:g} s") from None
        except AuthenticationError:
            raise UsageError(f"the cloud at {address} refused the secret; set {AUTHKEY_VARIABLE} "
                             "to the cloud's secret") from None
        except (OSError, EOFError) as error:
            raise CloudLost(f"cannot connect to the cloud at {address} ({error}); start it "
                            "with `raghub cloud serve --port PORT`") from None
        finally:
            pool.shutdown(wait=False)
        self.channel = Channel(connection, self.settings["rtt_ms"], self.settings["bandwidth_mbps"],
                               self.settings["timeout_s"], self._cloud_liveness)
        self._send({"kind": "hello", "rtt_ms": self.settings["rtt_ms"],
                    "bandwidth_mbps": self.settings["bandwidth_mbps"]})
        ready = self._receive()
        if ready.fields["vocab_size"] != len(self.model.tokenizer):
            raise UsageError(f"the cloud's model has {ready.fields['vocab_size']} tokens, the "
                             f"device's {len(self.model.tokenizer)}: both sides need the same model")
        self.cloud_has_corpus = ready.fields["has_corpus"]
        self._count_wire(WireCounters())
        return self.channel

    def _count_wire(self, before: WireCounters) -> None:
        """Add the messages and bytes the channel carried since `before` to the counters."""
        for key, value in asdict(self.channel.counters).items():
            self.counters[key] += value - getattr(before, key)

    def _spawn_cloud(self) -> str:
        """Start `raghub cloud serve --once` with the spec this model was loaded from (in the
        dtype it runs in) and a fresh secret; its address."""
        if self.model.loaded_from is None:
            raise UsageError(f"device-cloud starts its cloud from the spec model {self.model.name!r} was "
                             "loaded from, and it has none; give --cloud-address")
        arguments = ["--once", *replace(self.model.loaded_from, dtype=self.model.dtype).flags(),
                     "--threads", str(max(1, (os.cpu_count() or 2) // 2))]  # shares this machine
        if self.settings["cloud_corpus"]:
            arguments += ["--corpus", self.settings["cloud_corpus"],
                          "--retriever", self.settings["cloud_retriever"]]
        self._spawned_authkey = secrets.token_hex(16).encode()
        self.cloud_process, address = start_cloud(
            arguments, max(self.settings["timeout_s"], 300.0),  # the cloud loads the model first
            {AUTHKEY_VARIABLE: self._spawned_authkey.decode()})
        return address

    def _cloud_liveness(self) -> str | None:
        if self.cloud_process is not None and self.cloud_process.poll() is not None:
            return f"the cloud process exited with code {self.cloud_process.returncode}"
        return None

    def _receive(self) -> Message:
        try:
            message = self.channel.receive()
        except PeerLost as error:
            raise _lost(error) from None
        except BadMessage as error:
            raise CloudLost(f"the cloud sent a bad message: {error}") from None
        if message.kind == "error":
            raise CloudLost(f"the cloud failed: {message.fields['message']}")
        return message

    def _send(self, fields: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        try:
            self.channel.send(fields, arrays)
        except PeerLost as error:
            raise _lost(error) from None

    # one request: an example decoded jointly ---------------------------------------------

    def _decode_jointly(self, own_side: Callable[[], DocumentSide], request: dict,
                        arrays: dict[str, np.ndarray], steps: int,
                        choose: Callable[[int, torch.Tensor], int],
                        own_draft: Callable[[int, torch.Tensor], int],
                        stop_ids: set[int]) -> tuple[list[int], list[float]]:
        """Tokens agreed step by step with the cloud, and the aggregate log p of each. The
        device reads its own documents (`own_side()`) while the cloud reads its own."""
        import torch

        speculative = self.settings["mode"] == "speculative"
        self.requests += 1
        self.counters["requests"] += 1
        wire_before = replace(self.channel.counters)
        started = time.perf_counter()
        self._send({"kind": "open", "request": self.requests, "steps": steps, **request,
                    "mode": self.settings["mode"], "compression": self.settings["compression"],
                    "temperature": self.settings["temperature"]}, arrays)
        own = own_side()
        tokens, logprobs, epoch = [], [], 0
        for step in range(steps):
            own_logprobs = own.mixture()
            drafted = own_draft(step, own_logprobs)
            last = step == steps - 1
            if speculative and not last:
                own.advance(drafted)  # compute ahead while the cloud's message is in flight
            cloud = self._receive_step(step, epoch)
            if step == 0:
                self.counters["first_token_s"] += time.perf_counter() - started
            cloud_logprobs = unpack_distribution(cloud.arrays, own_logprobs.numel())
            joint = combine_sides(torch.stack([own_logprobs, cloud_logprobs]),
                                  torch.tensor([own.weight, cloud.fields["weight"]]))
            token = choose(step, joint)
            if speculative:
                target = torch.nn.functional.one_hot(torch.tensor(token), joint.numel()).float()
                token, cloud_kept = resolve_draft(cloud.fields["draft"], cloud_logprobs.exp(),
                                                  target, self.generator)
                self.counters["cloud_accepted"] += cloud_kept
                self.counters["device_accepted"] += drafted == token
            if token != cloud.fields["draft"]:
                epoch += 1
            done = last or token in stop_ids
            self._send({"kind": "verdict", "request": self.requests, "step": step,
                        "token": token, "done": done})
            tokens.append(token)
            logprobs.append(float(joint[token]))
            if done:
                break
            if not speculative:
                own.advance(token)
            elif drafted != token:
                own.rollback(1)
                own.advance(token)
        self.counters["tokens"] += len(tokens)
        self.counters["wall_s"] += time.perf_counter() - started
        self._count_wire(wire_before)
        return tokens, logprobs

    def _receive_step(self, step: int, epoch: int) -> Message:
        """The cloud's message for `step`, skipping speculation made stale by a rejection."""
        while True:
            message = self._receive()
            fields = message.fields
            if (fields["request"], fields["step"], fields["epoch"]) == (self.requests, step, epoch):
                self.counters["distribution_bytes"] += sum(a.nbytes for a in message.arrays.values())
                self.counters["full_distribution_bytes"] += 4 * len(self.model.tokenizer)
                return message

    def _prepare(self, hits: Sequence[Retrieved], prompt_for: Callable[[Passage], list[int]],
                 closed_book: list[int], template: tuple[list[int], list[int], int | None],
                 query: str) -> tuple[Callable[[], DocumentSide], dict, dict[str, np.ndarray]]:
        """The device's side (built once the cloud is reading its own documents) and what the
        open message tells the cloud: its share of the ranked list as prompt token ids, or,
        when it has its own corpus, the query and the prompt around a passage (`template`:
        token ids before and after it, and its length limit)."""
        from .sides import DocumentSide

        arrays = {"closed_book_ids": np.array(closed_book, dtype=np.int32)}
        if self.cloud_has_corpus:
            before, after, max_tokens = template
            device_hits, request = list(hits), {"query": query, "n_docs": len(hits) or 1,
                                                "passage_max_tokens": max_tokens}
            arrays |= {"before_ids": np.array(before, dtype=np.int32),
                       "after_ids": np.array(after, dtype=np.int32)}
        else:
            device_hits, cloud_hits = deal_alternately(hits)
            request = {}
            arrays |= {**flatten_prompts([prompt_for(h.passage) for h in cloud_hits]),
                       "scores": np.array([h.score for h in cloud_hits], dtype=np.float32)}
        depth = 1 if self.settings["mode"] == "speculative" else 0

        def own_side() -> DocumentSide:
            return DocumentSide(self.model, [prompt_for(h.passage) for h in device_hits],
                                [h.score for h in device_hits], self.settings["temperature"],
                                closed_book, max_rollback=depth)

        return own_side, request, arrays

    # the task families' entry points -------------------------------------------------------

    def score_windows(self, windows, retrieved):
        """Teacher forcing: the agreed token is the window's gold token at every step."""
        import torch

        self._connect()
        results = []
        for window, hits in zip(windows, retrieved):
            def prompt_for(passage, window=window):
                return passage_ids(self.model, passage, window.retrieved_max_length) + window.context_ids

            template = ([], window.context_ids, window.retrieved_max_length)
            targets = window.target_ids
            _, logprobs = self._decode_jointly(
                *self._prepare(hits, prompt_for, window.context_ids, template, window.query),
                len(targets), lambda step, _: targets[step], lambda step, _: targets[step], set())
            results.append(torch.tensor(logprobs, dtype=torch.float32))
        return results

    def answer(self, questions, retrieved):
        """Greedy generation from the aggregate until end of text or `max_new_tokens`."""
        self._connect()
        stop_ids = {self.model.tokenizer.eos_token_id, self.model.tokenizer.pad_token_id}
        greedy = lambda _step, logprobs: int(logprobs.argmax())  # noqa: E731
        answers = []
        for question, hits in zip(questions, retrieved):
            def prompt_for(passage, question=question):
                return self.model.encode(question.prompt([passage]))

            marker = "\0passage\0"
            before, _, after = question.prompt([Passage("", marker)]).partition(marker)
            template = (self.model.encode(before), self.model.encode(after), None)
            tokens, _ = self._decode_jointly(
                *self._prepare(hits, prompt_for, self.model.encode(question.prompt([])), template,
                               question.query),
                question.max_new_tokens, greedy, greedy, stop_ids)
            answers.append(question.answer_from(self.model.decode([t for t in tokens if t not in stop_ids])))
        return answers

    def run_stats(self):
        """Per-token costs of the whole run (every process of a resumed one), from `counters`."""
        count = self.counters
        tokens, requests = count["tokens"], count["requests"]
        if not tokens:
            return {}
        stats = {
            "mode": self.settings["mode"], "compression": self.settings["compression"],
            "rtt_ms": self.settings["rtt_ms"], "bandwidth_mbps": self.settings["bandwidth_mbps"],
            "tokens": tokens,
            "bytes_per_token": (count["bytes_sent"] + count["bytes_received"]) / tokens,
            "cloud_to_device_bytes_per_token": count["bytes_received"] / tokens,
            "messages_per_token": (count["messages_sent"] + count["messages_received"]) / tokens,
            "distribution_bytes_per_token": count["distribution_bytes"] / tokens,
            "compression_ratio": count["full_distribution_bytes"] / count["distribution_bytes"],
            "wall_ms_per_token": 1000 * count["wall_s"] / tokens,
            "first_token_ms": 1000 * count["first_token_s"] / requests,
            "ms_per_token_after_first": 1000 * (count["wall_s"] - count["first_token_s"])
                                        / max(tokens - requests, 1),
        }
        if self.settings["mode"] == "speculative":
            stats["acceptance_rate_cloud"] = count["cloud_accepted"] / tokens
            stats["acceptance_rate_device"] = count["device_accepted"] / tokens
        return stats

    def close(self):
        """Shut down the cloud this run started (waited for, or killed); a cloud given by
        --cloud-address is only disconnected from, and keeps serving other runs."""
        if self.channel is not None:
            if self.cloud_process is not None:
                try:
                    self.channel.send({"kind": "shutdown"})
                except PeerLost:
                    pass
            self.channel.close()
            self.channel = None
        if self.cloud_process is not None:
            try:
                self.cloud_process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.cloud_process.kill()
                self.cloud_process.wait()
            self.cloud_process.stdout.close()
            self.cloud_process = None
