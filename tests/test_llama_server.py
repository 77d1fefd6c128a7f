"""The `openai` backend against a real server: llama-cpp-python's OpenAI-compatible server serving
the embedded SmolLM2 GGUF on a free loopback port, started for this module and stopped after.
Its answers agree with the in-process `gguf` backend's, its generation log-probs too, and the
consistency probe refuses its echo prompt log-probs (shifted by one position in 0.3.36)."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from click.testing import CliRunner

from raghub import UsageError
from raghub.models import load_model
from raghub.cli import cli
from raghub.plugins.models import openai
from raghub.plugins.models.openai import OpenAICompatible
from benchmark_scripts import benchmark
from recorded_server import embedded_gguf

pytestmark = [pytest.mark.server, pytest.mark.real_model]
#: the most a generated token's ln p from the server may differ from in-process (nats): llama.cpp
#: computes with the Q4_1 blocks (and 8-bit activations), in-process with them dequantised to float32
GENERATION_TOLERANCE = 0.1
#: SQuAD questions answered both ways
QUESTIONS = 10
#: seconds the server has to load the model and answer
STARTUP_S = 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LlamaServer:
    """llama-cpp-python's server serving a GGUF file (the embedded one unless named) on one
    loopback port, which a test may stop and start again (with an API key it then requires)."""

    def __init__(self, log: Path, gguf: str | None = None):
        self.gguf = gguf or embedded_gguf()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        self.process: subprocess.Popen | None = None

    def start(self, api_key: str | None = None) -> None:
        """Started, and answering `/models` (with the key, if one is required)."""
        with open(self.log, "ab") as output:
            self.process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", self.gguf,
                                             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "4096",
                                             *(["--api_key", api_key] if api_key else [])],
                                            stdout=output, stderr=subprocess.STDOUT)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        deadline = time.monotonic() + STARTUP_S
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"the llama.cpp server exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/models", headers=headers, timeout=2).is_success:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the llama.cpp server did not answer within {STARTUP_S} s: {self.log.read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def running_server(folder: Path, gguf: str | None = None) -> Iterator[LlamaServer]:
    """A llama.cpp server serving `gguf` (default: the embedded one), its log in `folder`,
    stopped after the block."""
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None:
        pytest.skip("llama-cpp-python[server] is not installed (`make setup` installs it from the wheel cache)")
    running = LlamaServer(folder / "server.log", gguf)
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The llama.cpp server, started once for the module and stopped after it; a test that stops
    it starts it again as it was."""
    with running_server(tmp_path_factory.mktemp("llama-server")) as running:
        yield running


@pytest.fixture
def llama_server(server) -> str:
    """The /v1 URL of the llama.cpp server."""
    return server.url


@pytest.fixture(scope="module")
def in_process():
    return load_model(None, dtype="float32")


def generating_args(tokenizer: str | None = None) -> str:
    """The llama.cpp server takes prompts as text only, and its echo log-probs fail the probe."""
    return f"tokenizer={tokenizer or embedded_gguf()},prompt_as=text,logprobs_via=none"


def outcome(results: Path) -> tuple[dict, dict[str, str]]:
    """(metrics, each question's prediction) of the last run recorded in `results`."""
    record = json.loads((results / "records.jsonl").read_text().splitlines()[-1])
    lines = (results / record["samples"]).read_text().splitlines()
    return record["metrics"], {line["id"]: line["prediction"] for line in map(json.loads, lines)}


def run_predictions(tmp_path, method: str, model: list[str]) -> dict[str, str]:
    """Each question's prediction from `raghub run` of `method` on SQuAD with the `model` flags."""
    results = tmp_path / f"results-{len(list(tmp_path.iterdir()))}"
    result = CliRunner().invoke(cli, ["run", "--task", "squad", "--method", method, "--limit", str(QUESTIONS),
                                      "--dtype", "float32", "--results-dir", str(results), *model])
    assert result.exit_code == 0, result.output
    return outcome(results)[1]


@pytest.mark.parametrize("method", ["incontext", "none"])
def test_answers_through_the_server_mostly_agree_with_in_process(llama_server, tmp_path, method):
    """The server gets the prompts raghub builds, generates greedily (no repeat penalty) and stops
    where raghub would, so most answers are the same (a wrong prompt or stop agrees on almost
    none). Not all: llama.cpp computes with the Q4_1 blocks and 8-bit activations, in-process with
    them dequantised to float32, and greedy paths part at near-ties (41 of the first 50 answers
    agreed, `incontext` and `none` alike; the README has the numbers)."""
    served = run_predictions(tmp_path, method, ["--model", llama_server, "--model-args", generating_args()])
    own = run_predictions(tmp_path, method, [])
    agreeing = sum(served[key] == own[key] for key in own)
    print(f"{method}: {agreeing}/{len(own)} SQuAD answers the same through the llama.cpp server as in-process")
    assert len(served) == len(own) == QUESTIONS and agreeing > QUESTIONS / 2


@pytest.mark.parametrize("method", ["incontext", "none"])
def test_answers_through_a_server_computing_in_float32_are_the_in_process_ones(tmp_path, method):
    """Served a float32 copy of the embedded weights (equal to the in-process ones), llama.cpp
    computes the function in-process `gguf` computes, so every answer is the same: any change of
    prompt, stop or parsing on the server path shows here, where the quantised server's near-ties
    would hide it (50 of the first 50 agreed, log-probs within 0.0064 nats; benchmarks/README.md)."""
    gguf = tmp_path / "smollm2-float32.gguf"
    benchmark("float32_gguf").write_float32_gguf(Path(embedded_gguf()), gguf)
    with running_server(tmp_path, str(gguf)) as float32_server:
        served = run_predictions(tmp_path, method, ["--model", float32_server.url,
                                                    "--model-args", generating_args(str(gguf))])
    gguf.unlink()
    own = run_predictions(tmp_path, method, [])
    assert len(served) == QUESTIONS and served == own


def test_the_probe_refuses_the_servers_echo_logprobs(llama_server):
    with pytest.raises(UsageError, match=r"fails the consistency probe: it generated ' Berlin' with ln p -0\.0\d+ "
                                         r"but scores it at -\d+\.\d+ in the prompt \(logprobs_via=echo\)"):
        load_model(llama_server, model_args=f"tokenizer={embedded_gguf()},prompt_as=text")


def test_the_probe_refuses_the_server_when_its_default_repeat_penalty_is_left_on(llama_server, monkeypatch):
    monkeypatch.setattr(openai, "GREEDY", {"temperature": 0})
    with pytest.raises(UsageError, match=r"does not generate greedily at temperature 0: it generated ' four' "):
        load_model(llama_server, model_args=generating_args())


def test_generation_logprobs_agree_with_in_process(llama_server, in_process):
    served = load_model(llama_server, model_args=generating_args())
    prompts = ["The capital of France is", "Water boils at a temperature of", "The first president of the United States was"]
    differences = []
    for theirs, ours in zip(served.generate_line(prompts, 8), in_process.generate_line(prompts, 8)):
        shared = len(os.path.commonprefix([theirs.token_ids, ours.token_ids]))  # greedy paths may part later
        assert shared >= 1, (theirs.text, ours.text)
        differences += [abs(a - b) for a, b in zip(theirs.token_logprobs[:shared], ours.token_logprobs[:shared])]
    print("per-token |ln p server - ln p in-process|:", " ".join(f"{d:.4f}" for d in differences))
    assert differences and max(differences) <= GENERATION_TOLERANCE


def test_a_tokenizer_that_is_not_the_servers_is_refused(llama_server):
    from raghub.kits.embedded import default_encoder_path

    with pytest.raises(UsageError, match=r"tokenises 'The capital of France.*give --model-args tokenizer= the "
                                         r"served model's$"):
        load_model(llama_server, model_args=generating_args(default_encoder_path()))


# --- a server that goes away mid-run --------------------------------------------------------

#: the questions of the runs below: SQuAD `none`, one request at a time (the server sees the same
#: requests in the same order each time), finished examples kept per batch of two
INTERRUPTED_QUESTIONS = 6


def squad_none(url: str, results: Path, model_args: str = "") -> list[str]:
    return ["run", "--task", "squad", "--method", "none", "--limit", str(INTERRUPTED_QUESTIONS), "--batch-size", "2",
            "--model", url, "--model-args", ",".join(filter(None, [generating_args(), "concurrency=1", model_args])),
            "--results-dir", str(results)]


class Interrupting(httpx.HTTPTransport):
    """The network, counting the requests that answer an example (`answering`: not the probe's);
    `interrupt` runs before the `at`-th of them is sent."""

    def __init__(self, at: int | None = None, interrupt=None):
        super().__init__()
        self.at, self.interrupt, self.answering = at, interrupt, 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.method == "POST" else {}
        if body and body["prompt"] not in (openai.PROBE_PROMPT, openai.REPEAT_PROBE_PROMPT):
            self.answering += 1
            if self.answering == self.at:
                self.interrupt()
        return super().handle_request(request)


@pytest.fixture(scope="module")
def uninterrupted(server, tmp_path_factory) -> tuple[dict, dict[str, str]]:
    results = tmp_path_factory.mktemp("uninterrupted")
    result = CliRunner().invoke(cli, squad_none(server.url, results))
    assert result.exit_code == 0, result.output
    return outcome(results)


@pytest.fixture
def restored(server):
    """The server, running again after the test whatever the test did to it."""
    yield server
    if server.process.poll() is not None:
        server.start()


def test_a_server_restarted_mid_run_is_retried_and_the_record_equals_an_uninterrupted_one(
        restored, uninterrupted, tmp_path, monkeypatch):
    starting = threading.Thread(target=restored.start)

    def restart():
        restored.stop()
        starting.start()  # the request goes out while the server starts again

    transport = Interrupting(at=3, interrupt=restart)
    monkeypatch.setattr(OpenAICompatible, "transport", transport)
    result = CliRunner().invoke(cli, squad_none(restored.url, tmp_path / "r", "max_retries=8"))
    starting.join()
    assert result.exit_code == 0, result.output
    assert transport.answering > INTERRUPTED_QUESTIONS  # the request the stopped server refused, asked again
    assert outcome(tmp_path / "r") == uninterrupted


def test_a_killed_server_ends_the_run_with_exit_1_keeping_finished_examples_and_the_rerun_resumes(
        restored, uninterrupted, tmp_path, monkeypatch):
    results = tmp_path / "r"
    monkeypatch.setattr(OpenAICompatible, "transport", Interrupting(at=3, interrupt=lambda: restored.process.kill()))
    died = CliRunner().invoke(cli, squad_none(restored.url, results, "max_retries=1"))
    assert died.exit_code == 1
    assert died.output.strip().splitlines()[-1].startswith(f"Error: server 127.0.0.1:{restored.port}: POST completions "
                                                           "failed after 2 attempts: cannot be reached (ConnectError")
    [partial] = (results / ".partial").iterdir()
    assert len(partial.read_text().splitlines()) == 1  # the first batch of two is kept
    restored.start()
    resuming = Interrupting()
    monkeypatch.setattr(OpenAICompatible, "transport", resuming)
    resumed = CliRunner().invoke(cli, squad_none(restored.url, results, "max_retries=1"))
    assert resumed.exit_code == 0, resumed.output
    assert resuming.answering == INTERRUPTED_QUESTIONS - 2  # only the examples not finished
    assert outcome(results) == uninterrupted


def test_the_api_key_a_server_requires_is_sent_and_never_written(restored, tmp_path, monkeypatch):
    key = "sk-llama-3f9c2e7104"
    monkeypatch.setenv("RAGHUB_TEST_KEY", key)
    monkeypatch.setenv("RAGHUB_CACHE", str(tmp_path / "cache"))
    restored.stop()
    restored.start(api_key=key)
    try:
        without = CliRunner().invoke(cli, squad_none(restored.url, tmp_path / "refused"))
        assert without.exit_code == 2 and "GET models failed after 1 attempt: HTTP 401" in without.output
        result = CliRunner().invoke(cli, squad_none(restored.url, tmp_path / "r", "api_key_env=RAGHUB_TEST_KEY"))
    finally:
        restored.stop()
        restored.start()
    assert result.exit_code == 0, result.output
    assert key not in result.output
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.suffix == ".jsonl" for path in written)
    assert not [path for path in written if key.encode() in path.read_bytes()]
