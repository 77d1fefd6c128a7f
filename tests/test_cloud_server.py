"""The device-cloud server's faults: the shared secret, broken or silent devices, bad addresses.

The fast tests run the CLI in-process with every model backend's `load` made to fail, so they
prove that a refusal comes before the model loads. The `real_model` tests share one real
`raghub cloud serve` process on loopback."""

from __future__ import annotations

import re
import socket
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Client
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from raghub import UsageError
from raghub.cache import Cache
from raghub.cli import cli
from raghub.plugin_manager import registry
from raghub.plugins.methods.device_cloud import method as device_cloud_method
from raghub.plugins.methods.device_cloud import server
from raghub.plugins.methods.device_cloud.method import DeviceCloud
from raghub.plugins.methods.device_cloud.server import AUTHKEY_VARIABLE, start_cloud
from raghub.plugins.methods.device_cloud.wire import Channel, Message, decode_message

SECRET = "a-test-secret"
BAD_ADDRESSES = ["localhost", "localhost:70000", "localhost:abc", "localhost:0"]


@pytest.fixture
def no_model(monkeypatch):
    """Every model backend's `load` fails the test."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    for backend in registry().models.values():
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
    monkeypatch.setattr(server, "Listener", lambda *a, **k: pytest.fail("the cloud listened"))
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
    for backend in registry().models.values():
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
