"""The device-cloud wire: message encoding, DRAGON's distribution compression, and a channel.

Transport is `multiprocessing.connection` (length-framed, HMAC-authenticated messages over TCP);
this module only decides what goes inside a message. A message is a compact JSON header
(`kind` and scalar fields, plus a description of each array) followed by the arrays' raw
bytes, so any message can be decoded and inspected field by field (`decode_message`).

Distributions travel in one of two formats (`compression`):

- `none`: the full float32 log-probability vector.
- `dragon`: as DRAGON ships them: the smallest set of most probable tokens holding top-p
  (0.8) of the mass, renormalised; token ids as int16 offsets (id - 32768, so vocabularies
  up to 65,536 fit), log-probs as float16, each array lz4-compressed. Tokens outside the set
  get probability 0 on the receiving side.

Simulated network: each receiver delays a message until `sent_at + rtt/2 + bits/bandwidth`
(one-way latency plus serialisation), so transit overlaps the sender's next computation as it
would on a real link; queueing between messages is not modelled.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Callable, Sequence

import lz4.frame
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

MODES = ("synchronised", "speculative")
SPECULATION_DEPTH = 4
COMPRESSIONS = ("dragon", "none")
TOP_P = 0.8
TOKEN_OFFSET = 32768
HEADER_LENGTH = struct.Struct("<I")


class PeerLost(ConnectionError):
    """The other process closed the connection, died, or stayed silent past the timeout."""


class BadMessage(ValueError):
    """A message that does not decode, or lacks a field or array its kind needs."""


class Fields(dict):
    """A decoded message's fields or arrays: a missing one is a BadMessage, not a KeyError."""

    def __missing__(self, name: str):
        raise BadMessage(f"the message has no field {name!r}")


@dataclass
class Message:
    """A decoded message: scalar fields and named numpy arrays."""

    fields: dict
    arrays: dict[str, np.ndarray] = field(default_factory=Fields)

    @property
    def kind(self) -> str:
        return self.fields["kind"]


def encode_message(fields: dict, arrays: dict[str, np.ndarray] | None = None,
                   compressed: tuple[str, ...] = ()) -> bytes:
    """Header length, JSON header, then each array's bytes (lz4-framed when listed in
    `compressed`)."""
    blobs, described = [], []
    for name, array in (arrays or {}).items():
        blob = np.ascontiguousarray(array).tobytes()
        if name in compressed:
            blob = lz4.frame.compress(blob, compression_level=9)
        blobs.append(blob)
        described.append([name, array.dtype.str, len(blob), name in compressed])
    header = json.dumps({**fields, "arrays": described}, separators=(",", ":")).encode()
    return HEADER_LENGTH.pack(len(header)) + header + b"".join(blobs)


def decode_message(data: bytes) -> Message:
    """The message `encode_message` made; BadMessage for bytes that are not one."""
    try:
        (header_length,) = HEADER_LENGTH.unpack_from(data)
        start = HEADER_LENGTH.size + header_length
        fields = Fields(json.loads(data[HEADER_LENGTH.size:start]))
        arrays = Fields()
        for name, dtype, length, is_compressed in fields.pop("arrays"):
            blob = data[start:start + length]
            start += length
            arrays[name] = np.frombuffer(lz4.frame.decompress(blob) if is_compressed else blob, dtype=dtype)
    except Exception as error:  # whatever the bytes are, they are not a message
        raise BadMessage(f"undecodable message ({type(error).__name__}: {error})") from None
    return Message(fields, arrays)


def pack_distribution(logprobs: torch.Tensor, compression: str) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """The arrays (and which of them to lz4) that carry a log-prob vector in `compression`."""
    import torch

    if compression == "none":
        return {"logprobs": logprobs.float().numpy()}, ()
    probs, order = logprobs.float().exp().sort(descending=True)
    kept = int(torch.searchsorted(probs.cumsum(0), torch.tensor(TOP_P))) + 1
    ids = order[:kept]
    renormalised = logprobs[ids] - torch.logsumexp(logprobs[ids], 0)
    return ({"ids": (ids.numpy() - TOKEN_OFFSET).astype(np.int16),
             "logprobs": renormalised.numpy().astype(np.float16)}, ("ids", "logprobs"))


def unpack_distribution(arrays: dict[str, np.ndarray], vocab_size: int) -> torch.Tensor:
    """The float32 log-prob vector a `pack_distribution` message carries (-inf where dropped)."""
    import torch

    logprobs = torch.from_numpy(arrays["logprobs"].astype(np.float32))
    if "ids" not in arrays:
        return logprobs
    full = torch.full((vocab_size,), -torch.inf)
    full[torch.from_numpy(arrays["ids"].astype(np.int64) + TOKEN_OFFSET)] = logprobs
    return full


def flatten_prompts(prompts: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """Token-id lists as two arrays (all ids, each list's length) for a message."""
    return {"prompt_ids": np.array([t for p in prompts for t in p], dtype=np.int32),
            "prompt_lengths": np.array([len(p) for p in prompts], dtype=np.int32)}


def unflatten_prompts(arrays: dict[str, np.ndarray]) -> list[list[int]]:
    """The token-id lists `flatten_prompts` packed."""
    ends = np.cumsum(arrays["prompt_lengths"])
    return [chunk.tolist() for chunk in np.split(arrays["prompt_ids"], ends[:-1])] if len(ends) else []


@dataclass
class WireCounters:
    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


class Channel:
    """One side's end of a connection: typed messages, byte counts, simulated delay, and a
    timeout on every receive (`liveness` names why the peer is gone, or returns None)."""

    def __init__(self, connection: Connection, rtt_ms: float = 0.0, bandwidth_mbps: float = 0.0,
                 timeout_s: float | None = 60.0, liveness: Callable[[], str | None] = lambda: None):
        self.connection = connection
        self.rtt_ms = rtt_ms
        self.bandwidth_mbps = bandwidth_mbps
        self.timeout_s = timeout_s
        self.liveness = liveness
        self.counters = WireCounters()

    def send(self, fields: dict, arrays: dict[str, np.ndarray] | None = None,
             compressed: tuple[str, ...] = ()) -> None:
        data = encode_message({**fields, "sent_at": time.time()}, arrays, compressed)
        try:
            self.connection.send_bytes(data)
        except OSError as error:
            raise PeerLost(self._closed(error)) from None
        self.counters.messages_sent += 1
        self.counters.bytes_sent += len(data)

    def ready(self) -> bool:
        """True when a message is waiting (never blocks)."""
        return self._poll(0)

    def _poll(self, timeout: float) -> bool:
        try:
            return self.connection.poll(timeout)
        except (EOFError, OSError):
            return True  # the receive that follows reports the loss

    def receive(self, idle: bool = False) -> Message:
        """The next message, after its simulated transit time; PeerLost when the peer is gone or
        sends nothing for `timeout_s` (None, or `idle`: wait as long as the peer lives)."""
        deadline = None if self.timeout_s is None or idle else time.monotonic() + self.timeout_s
        while not self._poll(0.25):
            problem = self.liveness()
            if problem:
                raise PeerLost(problem)
            if deadline is not None and time.monotonic() > deadline:
                raise PeerLost(f"the peer sent nothing for {self.timeout_s:g} s")
        try:
            data = self.connection.recv_bytes()
        except (EOFError, OSError) as error:
            raise PeerLost(self._closed(error)) from None
        self.counters.messages_received += 1
        self.counters.bytes_received += len(data)
        message = decode_message(data)
        self._wait_for_transit(message.fields["sent_at"], len(data))
        return message

    def _wait_for_transit(self, sent_at: float, size: int) -> None:
        transit = self.rtt_ms / 2000
        if self.bandwidth_mbps > 0:
            transit += size * 8 / (self.bandwidth_mbps * 1e6)
        delay = sent_at + transit - time.time()
        if delay > 0:
            time.sleep(delay)

    def _closed(self, error: BaseException) -> str:
        if isinstance(error, BlockingIOError):  # the socket's stall limit (SO_RCVTIMEO/SO_SNDTIMEO)
            return "the peer stalled in the middle of a message"
        return self.liveness() or f"the peer closed the connection ({type(error).__name__})"

    def close(self) -> None:
        self.connection.close()
