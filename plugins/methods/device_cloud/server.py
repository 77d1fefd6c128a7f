"""The cloud process of device-cloud: `raghub cloud serve`, the server that streams one side's
distributions per request, and starting a server for a run.

The shared secret comes from RAGHUB_CLOUD_AUTHKEY; a cloud on loopback without one makes a
random one and prints it once. Each connection is authenticated and served on its own thread,
so a silent or broken device only loses its own connection; requests take turns on the model,
and no thread holds the model while it waits on the network.

Nothing a client does holds the cloud for long: authentication has one hard deadline for all
its bytes, at most `MAX_HANDSHAKES` connections authenticate at once (more wait in the listen
backlog, holding no thread or descriptor), a device's reply within a request has a deadline,
and a failing `accept` (no descriptors left) backs off and is logged once per interval.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Sequence

import click

from raghub import (CORE_OPTIONS, Cache, LanguageModel, ModelSpec, Passage, Registry, Retriever, RunError, UsageError,
                    cache_root, choose_backend, fingerprint, passage_ids, read_corpus)

from .wire import (SPECULATION_DEPTH, BadMessage, Channel, Message, PeerLost, pack_distribution,
                   unflatten_prompts)

AUTHKEY_VARIABLE = "RAGHUB_CLOUD_AUTHKEY"
LISTENING = "raghub cloud listening on"
HANDSHAKE_TIMEOUT_S = 10.0  #: for every byte of the authentication together
REPLY_TIMEOUT_S = 60.0  #: for a device's reply within a request, and for any half-sent message
MAX_HANDSHAKES = 16  #: connections authenticating at once
ACCEPT_BACKOFF_S = (0.05, 1.0)  #: the first and the longest wait after a failed accept
LOG_INTERVAL_S = 10.0  #: the shortest time between two log lines about unauthenticated clients
POLL_S = 0.25  #: how often waiting threads look whether the cloud stopped
#: what each side, the device's and the cloud's, needs of its model: a decoder-only model's
#: weights, run token by token with a KV cache per document (`DocumentSide`)
SIDE_REQUIRES = frozenset({"weights", "sequence_logprobs"})


class CloudLost(RunError):
    """The cloud process died, disconnected or went silent: one line; restart the cloud and
    rerun (the run resumes)."""


def _log(message: str) -> None:
    print(f"raghub cloud: {message}", file=sys.stderr, flush=True)


class _Handshake:
    """An accepted socket as `deliver_challenge` and `answer_challenge` use it (`send_bytes`,
    `recv_bytes` in `multiprocessing.connection`'s framing), every byte within one deadline:
    a client that sends half an answer and goes silent is dropped when it passes."""

    LENGTH = struct.Struct("!i")  # multiprocessing.connection's length prefix

    def __init__(self, sock: socket.socket, timeout_s: float):
        self.socket = sock
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s

    def _arm(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"not authenticated within {self.timeout_s:g} s")
        self.socket.settimeout(left)

    def send_bytes(self, data: bytes) -> None:
        self._arm()
        self.socket.sendall(self.LENGTH.pack(len(data)) + data)

    def recv_bytes(self, maxlength: int) -> bytes:
        (length,) = self.LENGTH.unpack(self._exactly(self.LENGTH.size))
        if not 0 <= length <= maxlength:
            raise OSError(f"bad message length {length} during authentication")
        return self._exactly(length)

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            self._arm()
            try:
                chunk = self.socket.recv(size - len(data))
            except TimeoutError:
                raise TimeoutError(f"not authenticated within {self.timeout_s:g} s") from None
            if not chunk:
                raise EOFError("the client hung up")
            data += chunk
        return data


def _limit_stalls(sock: socket.socket, timeout_s: float) -> None:
    """Make a read or write that makes no progress for `timeout_s` fail (EAGAIN) instead of
    blocking forever: a device that sends half a message, or stops reading, loses its own
    connection."""
    whole = int(timeout_s)
    timeval = struct.pack("@ll", whole, int((timeout_s - whole) * 1e6))
    for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
        sock.setsockopt(socket.SOL_SOCKET, option, timeval)


class _Throttled:
    """Log lines of one kind, at most one per `LOG_INTERVAL_S`, counting those held back."""

    def __init__(self):
        self.last_logged = -float("inf")
        self.held_back = 0
        self.lock = threading.Lock()

    def log(self, message: str) -> None:
        with self.lock:
            now = time.monotonic()
            if now - self.last_logged < LOG_INTERVAL_S:
                self.held_back += 1
                return
            if self.held_back:
                message += f" (and {self.held_back} more like it in the last {now - self.last_logged:.0f} s)"
            self.last_logged, self.held_back = now, 0
        _log(message)


class CloudServer:
    """The cloud side: serves each device on its own thread, one request per example; the
    requests take turns on the model, one computation at a time."""

    def __init__(self, model: LanguageModel, corpus: list[Passage] | None = None,
                 retriever_class: type[Retriever] | None = None,
                 handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S, reply_timeout_s: float = REPLY_TIMEOUT_S,
                 max_handshakes: int = MAX_HANDSHAKES):
        self.model = model
        self.corpus = corpus
        self.retriever = None
        if corpus is not None and retriever_class is not None:
            self.retriever = retriever_class(Cache(cache_root()))
            self.retriever.index(corpus, fingerprint([(p.id, p.title, p.text) for p in corpus]))
        self.handshake_timeout_s = handshake_timeout_s
        self.reply_timeout_s = reply_timeout_s
        self.handshakes = threading.BoundedSemaphore(max_handshakes)
        self.refusals = _Throttled()
        self.model_lock = threading.Lock()
        self.stopped = threading.Event()

    def serve(self, listening: socket.socket, authkey: bytes, once: bool) -> None:
        """Accept devices until one asks to shut down (or, with `once`, the first one that
        authenticated leaves, or `stopped` is set). Each connection authenticates on its own
        thread, so a silent one cannot hold up the next."""
        accepting = threading.Thread(target=self._accept, args=(listening, authkey, once),
                                     name="raghub cloud accept", daemon=True)
        accepting.start()
        self.stopped.wait()
        accepting.join()

    def _accept(self, listening: socket.socket, authkey: bytes, once: bool) -> None:
        """Take connections while fewer than `max_handshakes` are authenticating; after a
        failed accept, wait (doubling up to a second) and log once per interval."""
        listening.settimeout(POLL_S)
        failures, backoff = _Throttled(), 0.0
        while not self.stopped.is_set():
            if not self.handshakes.acquire(timeout=POLL_S):
                continue
            try:
                sock, peer = listening.accept()
            except TimeoutError:
                self.handshakes.release()
                continue
            except OSError as error:  # EMFILE, ENFILE, ENOBUFS, ...: the next accept may work
                self.handshakes.release()
                backoff = min(max(2 * backoff, ACCEPT_BACKOFF_S[0]), ACCEPT_BACKOFF_S[1])
                failures.log(f"could not accept a connection ({error}); retrying")
                self.stopped.wait(backoff)
                continue
            backoff = 0.0
            where = ":".join(map(str, peer[:2]))
            threading.Thread(target=self._serve_device, args=(sock, where, authkey, once),
                             name=f"raghub cloud {where}", daemon=True).start()

    def _serve_device(self, sock: socket.socket, where: str, authkey: bytes, once: bool) -> None:
        """Authenticate one connection and serve it; any fault closes this connection only."""
        try:
            handshake = _Handshake(sock, self.handshake_timeout_s)
            deliver_challenge(handshake, authkey)
            answer_challenge(handshake, authkey)
        except Exception as error:  # a wrong secret, a port scanner, a silent client, ...
            self.refusals.log(f"refused the connection from {where} ({type(error).__name__}: {error})")
            sock.close()
            return
        finally:
            self.handshakes.release()
        sock.settimeout(None)
        _limit_stalls(sock, self.reply_timeout_s)
        channel = Channel(Connection(sock.detach()), timeout_s=self.reply_timeout_s,
                          liveness=lambda: "the cloud stopped" if self.stopped.is_set() else None)
        try:
            if self._serve_connection(channel):
                self.stopped.set()
        except PeerLost as error:
            _log(f"the connection from {where} ended: {error}")
        except Exception as error:  # the device's fault or ours: told to it, logged, hung up
            problem = f"{type(error).__name__}: {error}"
            _log(f"closed the connection from {where} ({problem})")
            try:
                channel.send({"kind": "error", "message": problem})
            except PeerLost:
                pass
        finally:
            channel.close()
            if once:
                self.stopped.set()

    def _serve_connection(self, channel: Channel) -> bool:
        """Handle one device's messages; True when it asked the cloud to shut down."""
        while True:
            message = channel.receive(idle=True)  # a device may take its time between requests
            if message.kind == "shutdown":
                return True
            if message.kind == "hello":
                channel.rtt_ms = message.fields["rtt_ms"]
                channel.bandwidth_mbps = message.fields["bandwidth_mbps"]
                channel.send({"kind": "ready", "vocab_size": len(self.model.tokenizer),
                              "has_corpus": self.corpus is not None})
            elif message.kind == "open":
                self._answer_request(channel, message)
            else:
                raise BadMessage(f"unexpected {message.kind!r} message")

    def _documents(self, request: Message) -> tuple[list[list[int]], list[float]]:
        if self.retriever is None:
            return unflatten_prompts(request.arrays), request.arrays["scores"].tolist()
        fields = request.fields
        hits = self.retriever.search([fields["query"]], fields["n_docs"])[0] if fields["query"].strip() else []
        before, after = request.arrays["before_ids"].tolist(), request.arrays["after_ids"].tolist()
        max_tokens = fields["passage_max_tokens"]
        prompts = [before + (passage_ids(self.model, self.corpus[i], max_tokens) if max_tokens
                             else self.model.encode(self.corpus[i].as_text())) + after
                   for i, _ in hits]
        return prompts, [score for _, score in hits]

    def _answer_request(self, channel: Channel, request: Message) -> None:
        """Stream this side's distributions until the device's final verdict, each within
        `reply_timeout_s`. The model is held for each computation only, never while a
        message is in flight, so a silent device delays no other."""
        fields = request.fields
        speculative = fields["mode"] == "speculative"
        depth = SPECULATION_DEPTH if speculative else 0
        from .sides import DocumentSide

        with self.model_lock:
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
                with self.model_lock:
                    side.advance(unadvanced_draft)
                drafts.append(unadvanced_draft)
                unadvanced_draft = None
                if not channel.ready():
                    continue
            verdict = channel.receive()
            if verdict.kind != "verdict" or verdict.fields["step"] != confirmed:
                raise BadMessage(f"expected the verdict for step {confirmed}")
            if verdict.fields["done"]:
                return
            token = verdict.fields["token"]
            if drafts and drafts[0] == token:
                drafts.pop(0)
            else:
                if token != (drafts[0] if drafts else unadvanced_draft):
                    epoch += 1
                with self.model_lock:
                    side.rollback(len(drafts))
                    side.advance(token)
                drafts.clear()
                unadvanced_draft = None
            confirmed += 1


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name: assume it is reachable from elsewhere
        return False


def serve_cloud(found: Registry, host: str, port: int, spec: ModelSpec,
                corpus_path: str | None, retriever_name: str, once: bool) -> None:
    """Check the address, the secret and the model's backend, load the model (and corpus),
    listen, print the address (and a secret it made), serve."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be from 0 to 65535, not {port}")
    secret = os.environ.get(AUTHKEY_VARIABLE)
    if not secret and not _is_loopback(host):
        raise UsageError(f"refusing to serve on {host} without a secret: set {AUTHKEY_VARIABLE} "
                         "here and on the device, or serve on 127.0.0.1")
    if corpus_path and retriever_name not in found.retrievers:
        raise UsageError(f"unknown retriever '{retriever_name}' for the cloud corpus "
                         f"(known: {', '.join(sorted(found.retrievers))})")
    backend = choose_backend(found, spec.model, spec.backend, spec.model_args)
    backend.check_provides(SIDE_REQUIRES, "the device-cloud cloud")
    corpus = read_corpus(corpus_path) if corpus_path else None
    model = backend.load_from_spec(spec, None, 8)
    server = CloudServer(model, corpus, found.retrievers[retriever_name] if corpus else None)
    try:
        listening = socket.create_server((host, port), backlog=16)
    except OSError as error:
        raise UsageError(f"cannot listen on {host}:{port} ({error.strerror or error})") from None
    with listening:
        bound_host, bound_port = listening.getsockname()[:2]
        print(f"{LISTENING} {bound_host}:{bound_port}", flush=True)
        if not secret:
            secret = secrets.token_hex(16)
            print(f"raghub cloud secret: {secret} (set {AUTHKEY_VARIABLE}={secret} on the device)",
                  flush=True)
        server.serve(listening, secret.encode(), once)


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


@click.group("cloud")
def cloud_commands():
    """The cloud side of the device-cloud method (DRAGON)."""


@cloud_commands.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=int, default=7860, show_default=True, help="port to listen on (0: any free port)")
@click.option("--model", "model_spec", default=None, help="the same model the device runs (default: embedded)")
@click.option("--model-backend", default=None, help="the device's model backend (default: the first that loads --model)")
@click.option("--model-args", default="", help="the device's backend options as key=value,...")
@click.option("--dtype", type=click.Choice(CORE_OPTIONS["dtype"].type), default="float32", show_default=True,
              help="the weights' dtype (the device's)")
@click.option("--corpus", "corpus_path", default=None,
              help="the cloud's own passages (.jsonl or blank-line-separated text); "
                   "without it the device sends the cloud's share of each ranked list")
@click.option("--retriever", "retriever_name", default="bm25", show_default=True,
              help="retriever over --corpus")
@click.option("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
@click.option("--once", is_flag=True, help="exit when the first device disconnects")
@click.pass_obj
def serve_command(plugins, host, port, model_spec, model_backend, model_args, dtype, corpus_path, retriever_name,
                  threads, once):
    """Serve distributions to `raghub run --method device-cloud --cloud-address HOST:PORT`.

    Both sides read the shared secret from RAGHUB_CLOUD_AUTHKEY. Without it, a cloud on
    loopback prints a random one to give the device; any other --host needs it set."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    serve_cloud(plugins.registry, host, port, ModelSpec(model_spec, model_backend, model_args, dtype), corpus_path,
                retriever_name, once)
