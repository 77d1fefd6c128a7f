"""The device-cloud server's faults: the shared secret, broken or silent devices, bad addresses.

The fast tests run the CLI in-process with every model backend's `load` made to fail, so they
prove that a refusal comes before the model loads. The hostile-client tests run the real
server in this process, on loopback, with a stand-in model that predicts the next token id.
The `real_model` tests share one real `raghub cloud serve` process on loopback."""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from multiprocessing.connection import Client
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from raghub import UsageError
from raghub.cache import Cache
from raghub.cli import cli
from raghub.plugins.methods.device_cloud import method as device_cloud_method
from raghub.plugins.methods.device_cloud import server
from raghub.plugins.methods.device_cloud.method import DeviceCloud
from raghub.plugins.methods.device_cloud.server import AUTHKEY_VARIABLE, start_cloud
from raghub.plugins.methods.device_cloud.wire import Channel, Message, PeerLost, decode_message, flatten_prompts
from raghub.plugin_manager import PluginHost

SECRET = "a-test-secret"
BAD_ADDRESSES = ["localhost", "localhost:70000", "localhost:abc", "localhost:0"]


@pytest.fixture
def no_model(monkeypatch):
    """Every model backend's `load` fails the test."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    for backend in PluginHost().registry.models.values():
        monkeypatch.setattr(backend, "load", load)


@pytest.fixture
def no_connection(monkeypatch):
    """The device may not connect anywhere."""
    def client(*args, **kwargs):
        raise AssertionError("the device tried to connect")

    monkeypatch.setattr(device_cloud_method, "Client", client)


def _fake_model():
    """Just enough of a model for `DeviceCloud.__init__`."""
    return SimpleNamespace(tokenizer=[0] * 10)


def _serve(*args: str):
    return CliRunner().invoke(cli, ["cloud", "serve", *args])


# --- item 10: the shared secret --------------------------------------------------------------

def test_serving_off_loopback_without_a_secret_is_refused_before_the_model_loads(monkeypatch, no_model):
    monkeypatch.delenv(AUTHKEY_VARIABLE, raising=False)
    monkeypatch.setattr(server.socket, "create_server", lambda *a, **k: pytest.fail("the cloud listened"))
    result = _serve("--host", "0.0.0.0", "--port", "0")
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert AUTHKEY_VARIABLE in result.output and "0.0.0.0" in result.output


def test_serve_refuses_a_port_out_of_range_in_one_line(no_model):
    result = _serve("--port", "70000")
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "--port" in result.output and "70000" in result.output


def test_a_cloud_without_a_secret_prints_a_fresh_one_and_serves_with_it(monkeypatch):
    served = []
    for backend in PluginHost().registry.models.values():
        monkeypatch.setattr(backend, "load", lambda *args: _fake_model())
    monkeypatch.setattr(server.CloudServer, "serve", lambda self, *args: served.append(args))
    monkeypatch.delenv(AUTHKEY_VARIABLE, raising=False)
    printed = []
    for _ in range(2):
        result = _serve("--port", "0")
        assert result.exit_code == 0, result.output
        line = re.search(r"^raghub cloud secret: ([0-9a-f]{32}) \(set RAGHUB_CLOUD_AUTHKEY=\1 on the "
                         r"device\)$", result.output, re.MULTILINE)
        assert line, result.output
        printed.append(line[1])
    assert printed[0] != printed[1]  # random, not a public default
    assert [args[1] for args in served] == [secret.encode() for secret in printed]
    assert not hasattr(server, "DEFAULT_AUTHKEY")

    monkeypatch.setenv(AUTHKEY_VARIABLE, SECRET)
    result = _serve("--port", "0")
    assert result.exit_code == 0 and "secret" not in result.output  # a given secret stays unprinted
    assert served[-1][1] == SECRET.encode()


def test_the_device_needs_the_secret_for_a_cloud_address(monkeypatch, tmp_path, no_connection):
    monkeypatch.delenv(AUTHKEY_VARIABLE, raising=False)
    with pytest.raises(UsageError, match=f"set {AUTHKEY_VARIABLE}") as raised:
        method = DeviceCloud(_fake_model(), Cache(tmp_path), cloud_address="127.0.0.1:7860")
        method._connect()
    assert "\n" not in str(raised.value)


# --- item 12: a bad --cloud-address ------------------------------------------------------------

@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_a_malformed_cloud_address_is_refused_before_any_connection(address, monkeypatch, tmp_path,
                                                                     no_connection):
    monkeypatch.setenv(AUTHKEY_VARIABLE, SECRET)
    option = DeviceCloud.options["cloud_address"]
    with pytest.raises(UsageError, match="--cloud-address must be HOST:PORT"):
        option.convert("cloud_address", address)
    with pytest.raises(UsageError, match="--cloud-address must be HOST:PORT"):
        DeviceCloud(_fake_model(), Cache(tmp_path), cloud_address=address)._connect()


def test_run_with_a_malformed_cloud_address_exits_2_before_the_model_loads(monkeypatch, tmp_path, no_model):
    monkeypatch.setenv(AUTHKEY_VARIABLE, SECRET)
    results = tmp_path / "results"
    result = CliRunner().invoke(cli, ["run", "--task", "wikitext2", "--method", "device-cloud",
                                      "--cloud-address", "localhost:70000", "--results-dir", str(results)])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "--cloud-address" in result.output
    assert not results.exists()


# --- items 11 and 12 against a real `raghub cloud serve` ------------------------------------

@pytest.fixture(scope="module")
def cloud():
    """One real cloud on loopback for this module: (process, "host:port")."""
    process, address = start_cloud(["--threads", "1"], environment={AUTHKEY_VARIABLE: SECRET})
    yield process, address
    process.terminate()
    process.wait(timeout=30)
    process.stdout.close()


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _ready(address: str, timeout_s: float = 10.0) -> Message:
    """Connect as a device, say hello and disconnect; the cloud's reply, within `timeout_s`."""
    def hello() -> Message:
        channel = Channel(Client(_host_port(address), authkey=SECRET.encode()), timeout_s=timeout_s)
        try:
            channel.send({"kind": "hello", "rtt_ms": 0.0, "bandwidth_mbps": 0.0})
            return channel.receive()
        finally:
            channel.close()

    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(hello).result(timeout=timeout_s)
    finally:
        pool.shutdown(wait=False)


def _dropped_after(address: str, misbehave) -> str:
    """Authenticate, misbehave, and return the error the cloud sends before it hangs up."""
    connection = Client(_host_port(address), authkey=SECRET.encode())
    try:
        misbehave(connection)
        assert connection.poll(10), "the cloud did not answer"
        reply = decode_message(connection.recv_bytes())
        assert reply.kind == "error"
        assert connection.poll(10), "the cloud kept the connection open"
        with pytest.raises(EOFError):
            connection.recv_bytes()
    finally:
        connection.close()
    return reply.fields["message"]


@pytest.mark.real_model
def test_a_silent_connection_does_not_block_other_devices(cloud):
    process, address = cloud
    with socket.create_connection(_host_port(address)) as silent:
        assert _ready(address, timeout_s=5).kind == "ready"
        silent.settimeout(5)
        assert silent.recv(1)  # the cloud's challenge is waiting unanswered
    assert process.poll() is None


@pytest.mark.real_model
def test_a_broken_device_is_dropped_and_the_cloud_keeps_serving(cloud):
    process, address = cloud

    def send(fields):
        return lambda connection: Channel(connection).send(fields)

    def garbage(connection):
        connection.send_bytes(b"garbage")

    assert "undecodable message" in _dropped_after(address, garbage)
    assert "'nonsense'" in _dropped_after(address, send({"kind": "nonsense"}))
    assert "'rtt_ms'" in _dropped_after(address, send({"kind": "hello"}))
    assert process.poll() is None
    assert _ready(address).kind == "ready"


@pytest.mark.real_model
def test_a_wrong_secret_is_one_usage_error(cloud, monkeypatch, tmp_path):
    process, address = cloud
    monkeypatch.setenv(AUTHKEY_VARIABLE, "not-" + SECRET)
    method = DeviceCloud(_fake_model(), Cache(tmp_path), cloud_address=address)
    with pytest.raises(UsageError) as raised:
        method._connect()
    assert str(raised.value) == (f"the cloud at {address} refused the secret; set "
                                 f"{AUTHKEY_VARIABLE} to the cloud's secret")
    assert process.poll() is None
    assert _ready(address).kind == "ready"


# --- issue 30: no client stalls the cloud -------------------------------------------------------

VOCABULARY = 16


class _NextToken:
    """Just enough of a model for the cloud's side of a request: it predicts last id + 1."""

    tokenizer = [0] * VOCABULARY
    device = "cpu"

    def hf_model(self, input_ids, cache, use_cache):
        logits = 10.0 * torch.nn.functional.one_hot((input_ids + 1) % VOCABULARY, VOCABULARY).float()
        return SimpleNamespace(logits=logits, cache=cache)


def _cloud_threads() -> list[str]:
    return [thread.name for thread in threading.enumerate() if thread.name.startswith("raghub cloud")]


@contextmanager
def _cloud_in_process(**limits):
    """The real CloudServer on a free loopback port of this process: yields its (host, port);
    stops it afterwards and checks, within 10 s, that every thread it started has ended."""
    cloud = server.CloudServer(_NextToken(), **limits)
    listening = socket.create_server(("127.0.0.1", 0))
    serving = threading.Thread(target=cloud.serve, args=(listening, SECRET.encode(), False))
    serving.start()
    try:
        yield listening.getsockname()
    finally:
        cloud.stopped.set()
        serving.join(timeout=5)
        listening.close()
        deadline = time.monotonic() + 10
        while _cloud_threads() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not serving.is_alive() and not _cloud_threads()


def _device(address: tuple[str, int], connect_within_s: float = 5) -> Channel:
    """An authenticated device that said hello (each wait after connecting at most 5 s)."""
    pool = ThreadPoolExecutor(1)  # Client() itself has no timeout
    try:
        connection = pool.submit(Client, address, authkey=SECRET.encode()).result(timeout=connect_within_s)
    finally:
        pool.shutdown(wait=False)
    channel = Channel(connection, timeout_s=5)
    channel.send({"kind": "hello", "rtt_ms": 0.0, "bandwidth_mbps": 0.0})
    assert channel.receive().kind == "ready"
    return channel


def _open(channel: Channel, steps: int) -> None:
    """Ask for `steps` tokens over two documents of the device's own choosing."""
    channel.send({"kind": "open", "request": 1, "steps": steps, "mode": "synchronised",
                  "compression": "none", "temperature": 1.0},
                 {"closed_book_ids": np.array([1], dtype=np.int32), **flatten_prompts([[1, 2], [5]]),
                  "scores": np.array([1.0, 0.0], dtype=np.float32)})


def _request(channel: Channel, steps: int) -> list[Message]:
    """One whole request, agreeing to the cloud's draft at every step: the cloud's messages."""
    _open(channel, steps)
    sent = []
    for step in range(steps):
        sent.append(channel.receive())
        channel.send({"kind": "verdict", "request": 1, "step": step,
                      "token": sent[-1].fields["draft"], "done": step == steps - 1})
    return sent


def _half_answers(address: tuple[str, int], count: int) -> list[socket.socket]:
    """Clients that announce a 20-byte answer to the challenge, send 10 bytes and go silent."""
    clients = [socket.create_connection(address, timeout=5) for _ in range(count)]
    for client in clients:
        client.sendall(struct.Struct("!i").pack(20) + b"x" * 10)
    return clients


def _closed_by_peer(client: socket.socket, within_s: float) -> bool:
    """Whether the other end closes `client` within `within_s` (what it sent is read and dropped)."""
    deadline = time.monotonic() + within_s
    while (left := deadline - time.monotonic()) > 0:
        client.settimeout(left)
        try:
            if not client.recv(4096):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def test_clients_that_send_half_an_answer_are_bounded_and_dropped_at_the_deadline():
    """Regression: the handshake's deadline was polled and then `recv_bytes` waited with none,
    so a client that sent half the answer held a thread and a descriptor forever, and enough
    of them exhausted the descriptors. Now at most `max_handshakes` authenticate at once and
    every byte of it is due within `handshake_timeout_s`; an honest device gets its turn."""
    timeout_s, slots, hostile = 1.0, 4, 10
    with _cloud_in_process(handshake_timeout_s=timeout_s, max_handshakes=slots) as address:
        clients = _half_answers(address, hostile)
        try:
            time.sleep(timeout_s / 2)
            challenged = [client for client in clients if select.select([client], [], [], 0)[0]]
            assert len(challenged) == slots  # the others wait in the backlog
            started = time.monotonic()
            honest = _device(address)  # queued behind them: in once every hostile one is dropped
            honest.close()
            rounds = -(-hostile // slots)
            assert time.monotonic() - started < rounds * timeout_s + 2
            assert all(_closed_by_peer(client, within_s=rounds * timeout_s + 2) for client in clients)
        finally:
            for client in clients:
                client.close()


def test_a_silent_device_mid_request_delays_no_other_and_is_dropped_at_the_reply_deadline():
    """Regression: the cloud waited for a device's verdict holding the model, with no
    timeout, so one silent device stopped every other. Now no lock is held across a network
    wait, and a reply within a request is due within `reply_timeout_s`."""
    reply_timeout_s, steps = 2.0, 4
    with _cloud_in_process(reply_timeout_s=reply_timeout_s) as address:
        silent, honest = _device(address), _device(address)
        try:
            _open(silent, steps)
            assert silent.receive().fields["step"] == 0  # and then it never answers
            started = time.monotonic()
            served = _request(honest, steps)
            assert time.monotonic() - started < 1.0
            assert [message.fields["step"] for message in served] == list(range(steps))
            assert [m.fields["draft"] for m in served[1:]] == [(m.fields["draft"] + 1) % VOCABULARY
                                                               for m in served[:-1]]
            with pytest.raises(PeerLost):  # the cloud hangs up on the silent one
                silent.receive()
            assert time.monotonic() - started < reply_timeout_s + 2
        finally:
            silent.close()
            honest.close()


class _OutOfDescriptors:
    """A listening socket whose every accept fails as when the process has no descriptor left."""

    def __init__(self):
        self.accepts = 0

    def settimeout(self, _seconds):
        pass

    def accept(self):
        self.accepts += 1
        raise OSError(errno.EMFILE, "Too many open files")


def test_failing_accepts_back_off_and_are_logged_once_per_interval(capsys):
    """Regression: with the descriptors exhausted, the accept loop retried at once, spinning
    at 100 % CPU and logging hundreds of MB in seconds."""
    cloud = server.CloudServer(_NextToken())
    listening = _OutOfDescriptors()
    serving = threading.Thread(target=cloud.serve, args=(listening, SECRET.encode(), False))
    serving.start()
    time.sleep(1.5)  # backing off from 0.05 s, doubling: accepts at 0, 0.05, 0.15, 0.35, 0.75
    cloud.stopped.set()
    serving.join(timeout=5)
    assert not serving.is_alive()
    assert 2 <= listening.accepts <= 8
    logged = capsys.readouterr().err.splitlines()
    assert [line for line in logged if "could not accept" in line] == [
        "raghub cloud: could not accept a connection ([Errno 24] Too many open files); retrying"]


def test_an_authenticated_device_that_stops_in_the_middle_of_a_message_is_dropped(capsys):
    """Regression: after `poll` saw the first bytes, `recv_bytes` waited for the rest with no
    deadline, so half a message held its thread forever. Now a read that makes no progress for
    `reply_timeout_s` fails, and only that connection is closed."""
    reply_timeout_s = 1.0
    with _cloud_in_process(reply_timeout_s=reply_timeout_s) as address:
        stalled, honest = _device(address), _device(address)
        try:
            started = time.monotonic()
            os.write(stalled.connection.fileno(), struct.Struct("!i").pack(100) + b"x" * 50)
            assert [m.fields["step"] for m in _request(honest, 2)] == [0, 1]
            assert stalled.connection.poll(reply_timeout_s + 2)
            with pytest.raises(EOFError):
                stalled.connection.recv_bytes()
            assert time.monotonic() - started < reply_timeout_s + 2
        finally:
            stalled.close()
            honest.close()
    assert "ended: the peer stalled in the middle of a message" in capsys.readouterr().err


SERVE_UNDER_64_DESCRIPTORS = """
import resource, socket, sys
from types import SimpleNamespace
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
from raghub.plugins.methods.device_cloud.server import CloudServer
listening = socket.create_server(("127.0.0.1", 0))
print(listening.getsockname()[1], flush=True)
cloud = CloudServer(SimpleNamespace(tokenizer=[0] * 16), handshake_timeout_s=float(sys.argv[2]))
cloud.serve(listening, sys.argv[1].encode(), False)
"""


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (Linux's /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads CPU time from /proc")
def test_seventy_half_answers_under_64_descriptors_leave_the_cloud_idle_quiet_and_serving(tmp_path):
    """Regression (the audit's case): under `ulimit -n 64`, seventy clients that sent half an
    answer exhausted the descriptors, after which the accept loop spun at 100 % CPU, wrote
    hundreds of MB of log in seconds, and refused honest devices."""
    timeout_s, hostile = 1.0, 70
    log = tmp_path / "cloud.log"
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-c", SERVE_UNDER_64_DESCRIPTORS, SECRET, str(timeout_s)],
                                   stdout=subprocess.PIPE, stderr=stderr, text=True)
    clients = []
    try:
        assert select.select([process.stdout], [], [], 60)[0], "the cloud did not start"
        address = ("127.0.0.1", int(process.stdout.readline()))
        clients = _half_answers(address, hostile)
        started, cpu_before = time.monotonic(), _cpu_seconds(process.pid)
        rounds = -(-hostile // server.MAX_HANDSHAKES)
        _device(address, connect_within_s=rounds * timeout_s + 5).close()
        assert all(_closed_by_peer(client, within_s=rounds * timeout_s + 5) for client in clients)
        busy = (_cpu_seconds(process.pid) - cpu_before) / (time.monotonic() - started)
        assert busy < 0.5 and process.poll() is None
        assert log.stat().st_size < 10_000
    finally:
        for client in clients:
            client.close()
        process.kill()
        process.wait(timeout=10)
        process.stdout.close()
