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
import time

import httpx
import pytest
from click.testing import CliRunner

from raghub import UsageError
from raghub.models import load_model
from raghub.cli import cli
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


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """The /v1 URL of a llama.cpp server serving the embedded GGUF; stopped after the module."""
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None:
        pytest.skip("llama-cpp-python[server] is not installed (`make setup` installs it from the wheel cache)")
    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    with open(log, "wb") as output:
        server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", embedded_gguf(),
                                   "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096"],
                                  stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"the llama.cpp server exited ({server.returncode}): {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2).is_success:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the llama.cpp server did not answer within {STARTUP_S} s: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def in_process():
    return load_model(None, dtype="float32")


def generating_args(tokenizer: str | None = None) -> str:
    """The llama.cpp server takes prompts as text only, and its echo log-probs fail the probe."""
    return f"tokenizer={tokenizer or embedded_gguf()},prompt_as=text,logprobs_via=none"


def run_predictions(tmp_path, method: str, model: list[str]) -> dict[str, str]:
    """Each question's prediction from `raghub run` of `method` on SQuAD with the `model` flags."""
    results = tmp_path / f"results-{len(list(tmp_path.iterdir()))}"
    result = CliRunner().invoke(cli, ["run", "--task", "squad", "--method", method, "--limit", str(QUESTIONS),
                                      "--dtype", "float32", "--results-dir", str(results), *model])
    assert result.exit_code == 0, result.output
    record = json.loads((results / "records.jsonl").read_text().splitlines()[-1])
    lines = (results / record["samples"]).read_text().splitlines()
    return {line["id"]: line["prediction"] for line in map(json.loads, lines)}


@pytest.mark.parametrize("method", ["incontext", "none"])
def test_answers_through_the_server_mostly_agree_with_in_process(llama_server, tmp_path, method):
    """The server gets the prompts raghub builds and stops where raghub would, so most answers
    are the same (a wrong prompt or stop agrees on almost none). Not all: llama.cpp computes with
    the Q4_1 blocks and 8-bit activations, in-process with them dequantised to float32, and
    greedy paths part at near-ties (here 6 of 10 incontext and 7 of 10 none answers agreed)."""
    served = run_predictions(tmp_path, method, ["--model", llama_server, "--model-args", generating_args()])
    own = run_predictions(tmp_path, method, [])
    agreeing = sum(served[key] == own[key] for key in own)
    print(f"{method}: {agreeing}/{len(own)} SQuAD answers the same through the llama.cpp server as in-process")
    assert len(served) == len(own) == QUESTIONS and agreeing > QUESTIONS / 2


def test_the_probe_refuses_the_servers_echo_logprobs(llama_server):
    with pytest.raises(UsageError, match=r"fails the consistency probe: it generated ' Berlin' with ln p -0\.0\d+ "
                                         r"but scores it at -\d+\.\d+ in the prompt \(logprobs_via=echo\)"):
        load_model(llama_server, model_args=f"tokenizer={embedded_gguf()},prompt_as=text")


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
