"""`device-cloud`: DRAGON's distributed RAG, a device and a cloud process mixing distributions.

Each side runs the model over its own documents and keeps one KV cache per document. At every
step it forms its own mixture ℓ_side = logsumexp_g(log softmax(s/T)_g + log p_g) and its total
weight W_side = logsumexp(s/T); the cloud sends (ℓ_cloud, W_cloud) and the device, the
aggregator, mixes p = Σ_side softmax([W_device, W_cloud])_side · exp(ℓ_side), which is exactly
the `ensemble` over the union of both sides' documents (the same temperature T divides every
score). The device's documents never leave the device: only distributions, weights and token
ids go on the wire (see `device_cloud_wire`).

Where the documents come from:
- default (DRAGON's setup): the runner's one ranked list is dealt alternately, ranks 1, 3, ...
  to the device and 2, 4, ... to the cloud, so both sides hold comparably relevant documents
  (first-half/second-half would give the device every top document and make the cloud's
  share of the mixture, and hence the communication being measured, negligible). The cloud's
  share is sent to it once per example as prompt token ids, standing in for the cloud's own
  retrieval over the same public datastore.
- `--cloud-corpus PATH` (the real use): the device keeps the whole ranked list; the cloud
  process loads PATH, indexes it with `--cloud-retriever`, and retrieves for the query itself.
  A side left without documents contributes its closed-book distribution with weight 0.

Modes, per step (the agreed token is the decoding rule's choice from the aggregate: the gold
token when scoring a language-modelling window, the argmax when answering a question):
- `synchronised`: the cloud sends step t, the device aggregates and answers with the agreed
  token, and only then does the cloud advance: one round trip per token.
- `speculative`: each side drafts its own argmax token and advances on it without waiting, the
  cloud up to `SPECULATION_DEPTH` steps ahead, streaming its distributions. The device
  resolves the cloud's draft by the speculative-sampling rule against the decoding rule's
  target distribution (`resolve_draft`); a side whose draft is rejected rolls its KV caches
  back and re-advances on the agreed token, and the cloud's messages computed on the rejected
  draft are discarded (each carries an epoch, bumped at every rejection). When scoring, the
  device "drafts" the gold token it holds, so only the cloud ever rolls back. The target is
  one-hot (greedy decoding or teacher forcing), so both modes give identical log-probs and
  answers; speculation only hides round trips, and the acceptance rate says how often.

A lost cloud (killed, disconnected, silent past `--timeout-s`) raises `CloudLost`, one line,
after which the runner keeps every batch finished so far; a rerun resumes.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import subprocess
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor, TimeoutError as FutureTimeout
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any, Callable, Sequence

import click
import numpy as np
import torch

from raghub.cache import Cache, fingerprint
from raghub.hookspecs import hookimpl
from raghub.interfaces import Augmenter, Option, Passage, Retrieved, UsageError
from raghub.model import LanguageModel, cache_root
from raghub.plugins.device_cloud_wire import (
    COMPRESSIONS, TOKEN_OFFSET, Channel, Message, PeerLost, pack_distribution, unpack_distribution,
)
from raghub.plugins.ensemble import mixture_logprobs
from raghub.plugins.language_modelling import passage_ids

MODES = ("synchronised", "speculative")
SPECULATION_DEPTH = 4
AUTHKEY_VARIABLE = "RAGHUB_CLOUD_AUTHKEY"
DEFAULT_AUTHKEY = "raghub-device-cloud"
LISTENING = "raghub cloud listening on"


class CloudLost(UsageError):
    """The cloud process died, disconnected or went silent. Reported as one line like a usage
    error because the user's fix is the same: restart the cloud and rerun (the run resumes)."""


# --- the formulas -------------------------------------------------------------------------

def side_weight(scores: torch.Tensor, temperature: float = 1.0) -> float:
    """W_side = logsumexp(s / T): a side's share of the union's softmax, before normalising."""
    return float(torch.logsumexp(scores.double() / temperature, dim=-1))


def combine_sides(side_logprobs: torch.Tensor, side_weights: torch.Tensor) -> torch.Tensor:
    """The aggregate log p = logsumexp_side(log softmax(W)_side + ℓ_side): the REPLUG mixture
    with the sides as documents and their weights as scores. All sides closed-book (weights all
    -inf) count equally."""
    if torch.isneginf(side_weights).all():
        side_weights = torch.zeros_like(side_weights)
    return mixture_logprobs(side_logprobs, side_weights)


def resolve_draft(draft: int, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                  generator: torch.Generator) -> tuple[int, bool]:
    """Speculative sampling (Leviathan et al., Chen et al.): keep `draft` with probability
    min(1, target(draft) / draft_probs(draft)); otherwise sample from the residual
    max(0, target - draft_probs), renormalised. Returns (token, accepted)."""
    ratio = target_probs[draft] / draft_probs[draft]
    if ratio >= 1 or torch.rand((), generator=generator) < ratio:
        return draft, True
    residual = (target_probs - draft_probs).clamp(min=0)
    return int(torch.multinomial(residual / residual.sum(), 1, generator=generator)), False


# --- one side's documents -----------------------------------------------------------------

class DocumentSide:
    """One side's documents, each with its own KV cache, advanced token by token together.

    `mixture()` is ℓ_side at the current position; the last `max_rollback` positions can be
    undone. A side without documents runs the closed-book prompt with weight -inf.
    """

    def __init__(self, model: LanguageModel, prompts: Sequence[Sequence[int]],
                 scores: Sequence[float], temperature: float, closed_book: Sequence[int],
                 max_rollback: int = 0):
        self.model = model
        if prompts:
            self.scores = torch.tensor(scores, dtype=torch.float32)
            self.weight = side_weight(self.scores, temperature)
        else:
            prompts, self.scores, self.weight = [closed_book], torch.zeros(1), -float("inf")
        if not all(prompts):
            raise UsageError("device-cloud needs a non-empty prompt to condition the first token")
        self.temperature = temperature
        self.caches: list[Any] = [None] * len(prompts)
        first = self._forward(list(prompts))
        self._mixtures = deque([first], maxlen=max_rollback + 1)

    @torch.inference_mode()
    def _forward(self, new_tokens: list[Sequence[int]]) -> torch.Tensor:
        doc_logprobs = []
        for doc, ids in enumerate(new_tokens):
            output = self.model.hf_model(
                input_ids=torch.tensor([list(ids)], device=self.model.device),
                past_key_values=self.caches[doc], use_cache=True)
            self.caches[doc] = output.past_key_values
            doc_logprobs.append(output.logits[0, -1].float().log_softmax(-1).cpu())
        return mixture_logprobs(torch.stack(doc_logprobs), self.scores, self.temperature)

    def mixture(self) -> torch.Tensor:
        return self._mixtures[-1]

    def advance(self, token: int) -> None:
        self._mixtures.append(self._forward([[token]] * len(self.caches)))

    def rollback(self, steps: int) -> None:
        """Forget the last `steps` advanced tokens (their KV entries and mixtures)."""
        if steps == 0:
            return
        if steps >= len(self._mixtures):
            raise ValueError(f"cannot roll back {steps} steps; only {len(self._mixtures) - 1} kept")
        for _ in range(steps):
            self._mixtures.pop()
        for cache in self.caches:
            cache.crop(-steps)  # transformers >= 5: a negative count removes that many tokens


def deal_alternately(hits: Sequence[Retrieved]) -> tuple[list[Retrieved], list[Retrieved]]:
    """DRAGON's split of one ranked list: ranks 1, 3, ... to the device, 2, 4, ... to the cloud."""
    return list(hits[0::2]), list(hits[1::2])


def _flatten(prompts: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    return {"prompt_ids": np.array([t for p in prompts for t in p], dtype=np.int32),
            "prompt_lengths": np.array([len(p) for p in prompts], dtype=np.int32)}


def _unflatten(arrays: dict[str, np.ndarray]) -> list[list[int]]:
    ends = np.cumsum(arrays["prompt_lengths"])
    return [chunk.tolist() for chunk in np.split(arrays["prompt_ids"], ends[:-1])] if len(ends) else []


# --- the cloud process --------------------------------------------------------------------

def read_corpus(path: str) -> list[Passage]:
    """Passages from a .jsonl file (objects with `text`, optional `title` and `id`) or a text
    file (passages separated by blank lines)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"cloud corpus {path} not found: give a .jsonl file of {{\"text\": ...}} "
                         "objects or a text file of blank-line-separated passages")
    text = file.read_text(encoding="utf-8").replace("\r\n", "\n")
    if file.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [Passage(str(row.get("id", i)), row["text"], row.get("title", ""), "cloud")
                for i, row in enumerate(rows)]
    chunks = [chunk.strip() for chunk in text.split("\n\n") if chunk.strip()]
    return [Passage(str(i), chunk, "", "cloud") for i, chunk in enumerate(chunks)]


class CloudServer:
    """The cloud side: serves device connections one at a time, one request per example."""

    def __init__(self, model: LanguageModel, corpus: list[Passage] | None = None,
                 retriever_name: str = "bm25"):
        self.model = model
        self.corpus = corpus
        self.retriever = None
        if corpus is not None:
            from raghub.plugin_manager import registry

            retrievers = registry().retrievers
            if retriever_name not in retrievers:
                raise UsageError(f"unknown retriever '{retriever_name}' for the cloud corpus "
                                 f"(known: {', '.join(sorted(retrievers))})")
            self.retriever = retrievers[retriever_name](Cache(cache_root()))
            self.retriever.index(corpus, fingerprint([(p.id, p.title, p.text) for p in corpus]))

    def serve(self, listener: Listener, once: bool) -> None:
        """Accept devices until one asks to shut down (or, with `once`, the first leaves)."""
        while True:
            try:
                channel = Channel(listener.accept(), timeout_s=None)
            except (AuthenticationError, OSError, EOFError) as error:
                print(f"raghub cloud: refused a connection ({error})", file=sys.stderr)
                continue
            try:
                if self._serve_connection(channel):
                    return
            except PeerLost:
                print("raghub cloud: device disconnected", file=sys.stderr)
            finally:
                channel.close()
            if once:
                return

    def _serve_connection(self, channel: Channel) -> bool:
        """Handle one device's messages; True when it asked the cloud to shut down."""
        while True:
            message = channel.receive()
            if message.kind == "shutdown":
                return True
            if message.kind == "hello":
                channel.rtt_ms = message.fields["rtt_ms"]
                channel.bandwidth_mbps = message.fields["bandwidth_mbps"]
                channel.send({"kind": "ready", "vocab_size": len(self.model.tokenizer),
                              "has_corpus": self.corpus is not None})
            elif message.kind == "open":
                try:
                    self._answer_request(channel, message)
                except PeerLost:
                    raise
                except Exception as error:  # reported to the device, which stops the run with it
                    channel.send({"kind": "error", "message": f"{type(error).__name__}: {error}"})
            else:
                channel.send({"kind": "error", "message": f"unexpected {message.kind!r} message"})

    def _documents(self, request: Message) -> tuple[list[list[int]], list[float]]:
        if self.retriever is None:
            return _unflatten(request.arrays), request.arrays["scores"].tolist()
        fields = request.fields
        hits = self.retriever.search([fields["query"]], fields["n_docs"])[0] if fields["query"].strip() else []
        before, after = request.arrays["before_ids"].tolist(), request.arrays["after_ids"].tolist()
        max_tokens = fields["passage_max_tokens"]
        prompts = [before + (passage_ids(self.model, self.corpus[i], max_tokens) if max_tokens
                             else self.model.encode(self.corpus[i].as_text())) + after
                   for i, _ in hits]
        return prompts, [score for _, score in hits]

    def _answer_request(self, channel: Channel, request: Message) -> None:
        """Stream this side's distributions until the device's final verdict."""
        fields = request.fields
        speculative = fields["mode"] == "speculative"
        depth = SPECULATION_DEPTH if speculative else 0
        prompts, scores = self._documents(request)
        side = DocumentSide(self.model, prompts, scores, fields["temperature"],
                            request.arrays["closed_book_ids"].tolist(), max_rollback=depth)
        steps, confirmed, epoch = fields["steps"], 0, 0
        drafts: list[int] = []  # tokens advanced on but not yet confirmed
        unadvanced_draft = None  # the draft sent for the current position
        while True:
            position = confirmed + len(drafts)
            if unadvanced_draft is None and position < steps:
                logprobs = side.mixture()
                unadvanced_draft = int(logprobs.argmax())
                arrays, compressed = pack_distribution(logprobs, fields["compression"])
                channel.send({"kind": "step", "request": fields["request"], "step": position,
                              "epoch": epoch, "draft": unadvanced_draft, "weight": side.weight},
                             arrays, compressed)
            if speculative and len(drafts) < depth and position + 1 < steps:
                side.advance(unadvanced_draft)
                drafts.append(unadvanced_draft)
                unadvanced_draft = None
                if not channel.ready():
                    continue
            verdict = channel.receive()
            if verdict.kind != "verdict" or verdict.fields["step"] != confirmed:
                channel.send({"kind": "error", "message": f"expected the verdict for step {confirmed}"})
                return
            if verdict.fields["done"]:
                return
            token = verdict.fields["token"]
            if drafts and drafts[0] == token:
                drafts.pop(0)
            else:
                if token != (drafts[0] if drafts else unadvanced_draft):
                    epoch += 1
                side.rollback(len(drafts))
                drafts.clear()
                side.advance(token)
                unadvanced_draft = None
            confirmed += 1


def serve_cloud(host: str, port: int, model_spec: str | None, corpus_path: str | None,
                retriever_name: str, once: bool) -> None:
    """Load the model (and corpus), listen, print the address, serve."""
    model = LanguageModel.load(model_spec)
    server = CloudServer(model, read_corpus(corpus_path) if corpus_path else None, retriever_name)
    authkey = os.environ.get(AUTHKEY_VARIABLE, DEFAULT_AUTHKEY).encode()
    with Listener((host, port), authkey=authkey) as listener:
        bound_host, bound_port = listener.address
        print(f"{LISTENING} {bound_host}:{bound_port}", flush=True)
        server.serve(listener, once)


def start_cloud(arguments: Sequence[str] = (), timeout_s: float = 300.0,
                environment: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Run `raghub cloud serve --port 0 ARGUMENTS` in a new process; (process, "host:port")
    once it listens. CloudLost if it exits or stays silent for `timeout_s`."""
    script = Path(sys.executable).with_name("raghub")
    command = [str(script) if script.exists() else shutil.which("raghub") or "raghub",
               "cloud", "serve", "--port", "0", *arguments]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, **(environment or {})})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CloudLost(f"the cloud process exited with code {process.returncode} while "
                            f"starting: {' '.join(command)}")
        readable, _, _ = select.select([process.stdout], [], [], 0.5)
        line = process.stdout.readline() if readable else ""
        if line.startswith(LISTENING):
            return process, line.removeprefix(LISTENING).strip()
    process.kill()
    process.wait()
    raise CloudLost(f"the cloud process did not listen within {timeout_s:g} s: {' '.join(command)}")


# --- the device: the augmenter ------------------------------------------------------------

def _lost(error: PeerLost) -> CloudLost:
    return CloudLost(f"device-cloud lost the cloud mid-run: {error}; restart it and rerun "
                     "(finished examples are kept)")


class DeviceCloud(Augmenter):
    name = "device-cloud"
    description = ("DRAGON: device and cloud processes each mix their own documents' "
                   "distributions; the device aggregates them per token")
    needs_retrieval = True
    options = {
        "mode": Option(MODES, "synchronised", "synchronised: one round trip per token; "
                       "speculative: each side drafts ahead and rolls back on rejection"),
        "compression": Option(COMPRESSIONS, "dragon", "wire format of each distribution: dragon "
                              "(top-p 0.8, int16 ids, fp16 log-probs, lz4) or none (full fp32)"),
        "temperature": Option(float, 1.0, "retrieval-score temperature T of the mixture weights", above=0),
        "cloud_address": Option(str, "", "host:port of a running `raghub cloud serve` "
                                "(default: start one for this run)"),
        "cloud_corpus": Option(str, "", "passages the spawned cloud retrieves from itself (.jsonl "
                               "or blank-line-separated text); default: split the run's ranked list"),
        "cloud_retriever": Option(str, "bm25", "retriever the spawned cloud uses over --cloud-corpus"),
        "rtt_ms": Option(float, 0.0, "simulated network round-trip time in milliseconds", at_least=0),
        "bandwidth_mbps": Option(float, 0.0, "simulated bandwidth in Mbit/s (0: unlimited)", at_least=0),
        "timeout_s": Option(float, 120.0, "seconds to wait for the cloud before giving up", above=0),
    }

    def __init__(self, model: LanguageModel, cache: Cache, **options: Any):
        super().__init__(model, cache, **options)
        if self.settings["cloud_address"] and self.settings["cloud_corpus"]:
            raise UsageError("--cloud-corpus is for a cloud this run starts; give the corpus to "
                             "`raghub cloud serve --corpus` when using --cloud-address")
        if len(model.tokenizer) > 2 * TOKEN_OFFSET:
            raise UsageError(f"device-cloud's int16 token ids fit vocabularies up to {2 * TOKEN_OFFSET} "
                             f"tokens; this model has {len(model.tokenizer)}")
        self.cloud_process: subprocess.Popen | None = None
        self.channel: Channel | None = None
        self.cloud_has_corpus = False
        self.requests = 0
        self.tokens = 0
        self.wall_s = 0.0
        self.first_token_s = 0.0
        self.cloud_accepted = 0
        self.device_accepted = 0
        self.distribution_bytes = 0
        self.full_distribution_bytes = 0
        self.generator = torch.Generator().manual_seed(0)

    # connection ---------------------------------------------------------------------------

    def _connect(self) -> Channel:
        if self.channel is not None:
            return self.channel
        address = self.settings["cloud_address"] or self._spawn_cloud()
        host, _, port = address.rpartition(":")
        authkey = (self._spawned_authkey if self.cloud_process is not None
                   else os.environ.get(AUTHKEY_VARIABLE, DEFAULT_AUTHKEY).encode())
        pool = ThreadPoolExecutor(1)  # Client() itself has no timeout
        future = pool.submit(Client, (host or "127.0.0.1", int(port)), authkey=authkey)
        try:
            connection = future.result(timeout=self.settings["timeout_s"])
        except FutureTimeout:
            raise CloudLost(f"the cloud at {address} did not accept the connection within "
                            f"{self.settings['timeout_s']:g} s (busy with another device?)") from None
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
        return self.channel

    def _spawn_cloud(self) -> str:
        """Start `raghub cloud serve --once` with this model and a fresh secret; its address."""
        arguments = ["--once", "--model", self.model.hf_model.name_or_path,
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
        speculative = self.settings["mode"] == "speculative"
        self.requests += 1
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
                self.first_token_s += time.perf_counter() - started
            cloud_logprobs = unpack_distribution(cloud.arrays, own_logprobs.numel())
            joint = combine_sides(torch.stack([own_logprobs, cloud_logprobs]),
                                  torch.tensor([own.weight, cloud.fields["weight"]]))
            token = choose(step, joint)
            if speculative:
                target = torch.nn.functional.one_hot(torch.tensor(token), joint.numel()).float()
                token, cloud_kept = resolve_draft(cloud.fields["draft"], cloud_logprobs.exp(),
                                                  target, self.generator)
                self.cloud_accepted += cloud_kept
                self.device_accepted += drafted == token
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
        self.tokens += len(tokens)
        self.wall_s += time.perf_counter() - started
        return tokens, logprobs

    def _receive_step(self, step: int, epoch: int) -> Message:
        """The cloud's message for `step`, skipping speculation made stale by a rejection."""
        while True:
            message = self._receive()
            fields = message.fields
            if (fields["request"], fields["step"], fields["epoch"]) == (self.requests, step, epoch):
                self.distribution_bytes += sum(a.nbytes for a in message.arrays.values())
                self.full_distribution_bytes += 4 * len(self.model.tokenizer)
                return message

    def _prepare(self, hits: Sequence[Retrieved], prompt_for: Callable[[Passage], list[int]],
                 closed_book: list[int], template: tuple[list[int], list[int], int | None],
                 query: str) -> tuple[Callable[[], DocumentSide], dict, dict[str, np.ndarray]]:
        """The device's side (built once the cloud is reading its own documents) and what the
        open message tells the cloud: its share of the ranked list as prompt token ids, or,
        when it has its own corpus, the query and the prompt around a passage (`template`:
        token ids before and after it, and its length limit)."""
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
            arrays |= {**_flatten([prompt_for(h.passage) for h in cloud_hits]),
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
            answers.append(question.extract(self.model.decode([t for t in tokens if t not in stop_ids])))
        return answers

    def run_stats(self):
        counters = self.channel.counters if self.channel else None
        if not self.tokens or counters is None:
            return {}
        stats = {
            "mode": self.settings["mode"], "compression": self.settings["compression"],
            "rtt_ms": self.settings["rtt_ms"], "bandwidth_mbps": self.settings["bandwidth_mbps"],
            "tokens": self.tokens,
            "bytes_per_token": (counters.bytes_sent + counters.bytes_received) / self.tokens,
            "cloud_to_device_bytes_per_token": counters.bytes_received / self.tokens,
            "messages_per_token": (counters.messages_sent + counters.messages_received) / self.tokens,
            "distribution_bytes_per_token": self.distribution_bytes / self.tokens,
            "compression_ratio": self.full_distribution_bytes / self.distribution_bytes,
            "wall_ms_per_token": 1000 * self.wall_s / self.tokens,
            "first_token_ms": 1000 * self.first_token_s / self.requests,
            "ms_per_token_after_first": 1000 * (self.wall_s - self.first_token_s)
                                        / max(self.tokens - self.requests, 1),
        }
        if self.settings["mode"] == "speculative":
            stats["acceptance_rate_cloud"] = self.cloud_accepted / self.tokens
            stats["acceptance_rate_device"] = self.device_accepted / self.tokens
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


# --- registration -------------------------------------------------------------------------

@click.group("cloud")
def cloud_commands():
    """The cloud side of the device-cloud method (DRAGON)."""


@cloud_commands.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=int, default=7860, show_default=True, help="port to listen on (0: any free port)")
@click.option("--model", "model_spec", default=None, help="the same model the device runs (default: embedded)")
@click.option("--corpus", "corpus_path", default=None,
              help="the cloud's own passages (.jsonl or blank-line-separated text); "
                   "without it the device sends the cloud's share of each ranked list")
@click.option("--retriever", "retriever_name", default="bm25", show_default=True,
              help="retriever over --corpus")
@click.option("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
@click.option("--once", is_flag=True, help="exit when the first device disconnects")
def serve_command(host, port, model_spec, corpus_path, retriever_name, threads, once):
    """Serve distributions to `raghub run --method device-cloud --cloud-address HOST:PORT`.

    Both sides read the shared secret from RAGHUB_CLOUD_AUTHKEY (set it off loopback)."""
    if threads:
        torch.set_num_threads(threads)
    serve_cloud(host, port, model_spec, corpus_path, retriever_name, once)


@hookimpl
def register_augmenters(register):
    register(DeviceCloud)


@hookimpl
def register_commands(cli):
    cli.add_command(cloud_commands)
