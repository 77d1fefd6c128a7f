"""The `openai` model backend against response JSON in vLLM's and OpenAI's documented shapes and
one recorded from llama.cpp's server (tests/recorded_server.py): scoring by echo and by
prompt_logprobs, generation, the consistency probe, retries and one-line failures, the API key
kept out of everything written, and the capabilities it declares."""

import functools
import json

import httpx
import pytest
from click.testing import CliRunner

from bad_input import assert_one_line_exit_2, model_never_loads  # noqa: F401 (a fixture)
from raghub import RunError, UsageError
from raghub.models import load_model
from raghub.cli import cli
from raghub.plugins.models import openai
from raghub.plugins.models.openai import OpenAICompatible
from raghub.progress import RunProgress, run_progress
from recorded_server import RecordedServer, embedded_gguf

URL = "http://models.example:8000/v1"
#: where the recorded sequence's first generated token sits (after the 12 probe prompt tokens)
PROBE_LENGTH = 12

pytestmark = pytest.mark.real_model  # the embedded SmolLM2's tokenizer, read from its GGUF file


@pytest.fixture(autouse=True)
def tokenizer_read_once(monkeypatch):
    """The GGUF tokenizer read once for the whole module, and no pause between retries."""
    monkeypatch.setattr(openai, "load_tokenizer", cached_tokenizer)
    monkeypatch.setattr(openai, "FIRST_BACKOFF", 0)


#: the real `load_tokenizer`, remembering what it read
cached_tokenizer = functools.lru_cache(maxsize=None)(openai.load_tokenizer)


def serving(monkeypatch, server: RecordedServer) -> RecordedServer:
    monkeypatch.setattr(OpenAICompatible, "transport", server.transport)
    return server


def load(model_args: str = ""):
    return load_model(URL, model_args=",".join(filter(None, [f"tokenizer={embedded_gguf()}", model_args])))


def completions(server: RecordedServer) -> list[dict]:
    return [json.loads(r.content) for r in server.requests if r.url.path.endswith("/completions")]


def answering(body: dict) -> bool:
    """Whether a completions request generates for an example (not scoring, not the probe)."""
    probes = [cached_tokenizer(embedded_gguf()).encode(prompt) for prompt in (openai.PROBE_PROMPT, openai.REPEAT_PROBE_PROMPT)]
    return not body.get("echo") and body["prompt"] not in probes


# --- scoring --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vllm", "openai"])
def test_echo_scores_each_prompt_token_after_the_first_and_drops_the_generated_entry(monkeypatch, name):
    server = serving(monkeypatch, RecordedServer(name))
    model = load()
    recorded = server.recorded["echo"]["choices"][0]["logprobs"]["token_logprobs"]
    ids = server.ids
    full, tail = model.sequence_logprobs([ids, ids[:8]], [1, 5])
    assert full.tolist() == pytest.approx(recorded[1: len(ids)])  # not the generated entry after them
    assert tail.tolist() == pytest.approx(recorded[5:8])
    scoring = completions(server)[-1]
    assert scoring["prompt"] in (ids, ids[:8]) and scoring["echo"] is True  # raghub's token ids are scored
    assert (scoring["logprobs"], scoring["max_tokens"], scoring["temperature"]) == (1, 1, 0)


@pytest.mark.parametrize("logprobs_via", ["echo", "prompt_logprobs"])
def test_a_prompt_token_the_server_gives_no_log_prob_is_one_line_not_a_traceback(monkeypatch, logprobs_via):
    """A null log-prob past position 0 (or a prompt_logprobs entry without the token) ended
    the run in a TypeError traceback."""
    server = serving(monkeypatch, RecordedServer("vllm"))
    model = load(f"logprobs_via={logprobs_via}")

    def without_the_fourth(request):
        server.fail = None
        answer = json.loads(server(request).content)
        server.fail = without_the_fourth
        choice = answer["choices"][0]
        if logprobs_via == "echo":
            choice["logprobs"]["token_logprobs"][3] = None
        else:
            choice["prompt_logprobs"][3] = None
        return httpx.Response(200, json=answer)

    server.fail = without_the_fourth
    with pytest.raises(RunError, match=f"returned no log-prob for prompt token 3 of 10 \\(logprobs_via={logprobs_via}\\)"):
        model.sequence_logprobs([server.ids[:10]], [1])


def test_vllms_prompt_logprobs_score_the_same_tokens(monkeypatch):
    server = serving(monkeypatch, RecordedServer("vllm"))
    model = load("logprobs_via=prompt_logprobs")
    recorded = server.recorded["prompt_logprobs"]["choices"][0]["prompt_logprobs"]
    [scored] = model.sequence_logprobs([server.ids], [3])
    assert scored.tolist() == pytest.approx([recorded[t][str(server.ids[t])]["logprob"]
                                             for t in range(3, len(server.ids))])
    assert completions(server)[-1]["prompt_logprobs"] == 0 and "echo" not in completions(server)[-1]


def test_a_server_without_prompt_logprobs_is_refused_when_asked_for_them(monkeypatch):
    serving(monkeypatch, RecordedServer("openai", fail=lambda request: httpx.Response(
        200, json={"choices": [{"text": "", "logprobs": None}]}) if b"prompt_logprobs" in request.content else None))
    with pytest.raises(UsageError, match="returned no prompt_logprobs for 16 prompt tokens"):
        load("logprobs_via=prompt_logprobs")


def test_text_prompts_that_tokenise_otherwise_are_refused_not_scored(monkeypatch):
    """Regression: with prompt_as=text the server scores its own tokens of the decoded text;
    tokens that do not come back from their text (a sequence that starts inside a character
    decodes to U+FFFD, one token of its own) had other tokens' log-probs scored in their places."""
    serving(monkeypatch, RecordedServer("vllm"))
    model = load("prompt_as=text")
    ids = model.encode("emoji \N{PARTY POPPER} party")[3:]  # the popper's last two bytes, then " party"
    assert model.encode(model.decode(ids)) != ids
    with pytest.raises(RunError, match="prompt_as=text cannot score .* give --model-args prompt_as=tokens"):
        model.sequence_logprobs([ids], [1])


# --- generation -----------------------------------------------------------------------------

def test_one_line_generation_is_greedy_stops_at_a_newline_and_returns_the_token_logprobs(monkeypatch):
    server = serving(monkeypatch, RecordedServer("vllm"))
    model = load()
    [generation] = model.generate_line([model.decode(server.ids[:PROBE_LENGTH])], 4)
    recorded = server.recorded["generation"]["choices"][0]
    assert generation.text == recorded["text"]
    assert generation.token_logprobs == recorded["logprobs"]["token_logprobs"]
    assert generation.token_ids == server.ids[PROBE_LENGTH:]  # what FLARE cuts a sentence at
    request = completions(server)[-1]
    assert (request["temperature"], request["stop"], request["max_tokens"]) == (0, ["\n"], 4)


def test_a_one_line_generation_sends_a_chat_prompt_s_template_tokens_as_text(monkeypatch):
    """Regression: with prompt_as=text the prompt was decoded skipping special tokens, so a chat
    prompt (a task's `prompt: chat`, the correctness judge) reached the server without its
    template's <|im_start|> and <|im_end|>: another prompt than in-process, answered silently."""
    server = serving(monkeypatch, RecordedServer("vllm"))
    model = load("prompt_as=text")
    prompt = model.chat_prompt("What is the capital of France?")
    assert "<|im_start|>" in prompt
    model.generate_line([prompt], 4)
    assert completions(server)[-1]["prompt"] == prompt


def test_a_one_line_generation_that_starts_with_a_newline_ends_at_the_next_one_as_in_process(monkeypatch):
    """Regression: when the stop at a newline left nothing, the generation asked again without
    a stop was kept whole (every line up to max_new_tokens), so adaptive's mean token log-prob
    and the generated-token count took tokens the in-process backend never generates."""
    def answer(text, tokens):
        return httpx.Response(200, json={"choices": [{"text": text, "finish_reason": "stop" if not tokens else "length",
                                                      "logprobs": {"tokens": tokens, "token_logprobs": [-0.25] * len(tokens),
                                                                   "top_logprobs": [{t: -0.25} for t in tokens]}}]})

    def newline_first(request):
        body = json.loads(request.content) if request.method == "POST" else {}
        if body and answering(body):
            return answer("", []) if "stop" in body else answer("\nParis\nBerlin", ["\n", "Paris", "\n", "Berlin"])
        return None

    serving(monkeypatch, RecordedServer("vllm", fail=newline_first))
    [generation] = load().generate_line(["Q:"], 4)
    assert (generation.text, generation.token_logprobs) == ("\nParis\n", [-0.25] * 3)


def passing_over_paris(request):
    """A `fail` that answers each generation as a server that penalises repeats: ' Lyon' where its
    own log-probs put ' Paris' first."""
    return httpx.Response(200, json={"choices": [{"text": " Lyon", "finish_reason": "length", "logprobs": {
        "tokens": [" Lyon"], "token_logprobs": [-0.9], "top_logprobs": [{" Paris": -0.5, " Lyon": -0.9}]}}]})


def test_generation_asks_the_server_not_to_penalise_repeats(monkeypatch):
    """llama-cpp-python's server penalises repeats at temperature 0 unless the request sets
    repeat_penalty (its default is 1.1): answers copied from the passages were passed over."""
    def penalising_unless_asked_not_to(request):
        body = json.loads(request.content) if request.method == "POST" else {}
        generating = body and not body.get("echo")
        return passing_over_paris(request) if generating and body.get("repeat_penalty", 1.1) != 1 else None

    server = serving(monkeypatch, RecordedServer("vllm", fail=penalising_unless_asked_not_to))
    model = load("logprobs_via=none")
    assert [g.text for g in model.generate_line(["The capital of France is"], 4)] == [" Paris"]
    assert {(body["temperature"], body["repeat_penalty"]) for body in completions(server)} == {(0, 1.0)}


def test_a_server_that_refuses_repeat_penalty_is_asked_without_it_once_the_probe_finds_out(monkeypatch):
    """Regression: OpenAI's API refuses a request field it does not know (HTTP 400), and
    repeat_penalty is llama.cpp's, so every run against it ended at the probe's first request."""
    server = serving(monkeypatch, RecordedServer("openai"))
    model = load()
    assert [g.text for g in model.generate_line(["The capital of France is"], 4)] == [" Paris"]
    sent = ["repeat_penalty" in body for body in completions(server)]
    assert sent == [True] + [False] * (len(sent) - 1)  # refused once, at the probe, not asked again
    assert model.hardware()["greedy_fields"] == {"temperature": 0}


def test_a_server_asked_without_repeat_penalty_is_still_refused_when_it_does_not_generate_greedily(monkeypatch):
    def penalising_when_not_asked(request):
        body = request.content
        generating = request.method == "POST" and b'"echo"' not in body and b"repeat_penalty" not in body
        return passing_over_paris(request) if generating else None

    serving(monkeypatch, RecordedServer("openai", fail=penalising_when_not_asked))
    with pytest.raises(UsageError, match="^server models.example:8000 does not generate greedily at temperature 0: it "
                                         "generated ' Lyon' "):
        load("logprobs_via=none")


def test_a_server_that_does_not_generate_greedily_is_refused_before_the_run(monkeypatch):
    serving(monkeypatch, RecordedServer("vllm", fail=lambda request: passing_over_paris(request)
                                        if request.method == "POST" and b'"echo"' not in request.content else None))
    with pytest.raises(UsageError) as refused:
        load("logprobs_via=none")
    assert str(refused.value) == (
        "server models.example:8000 does not generate greedily at temperature 0: it generated ' Lyon' (ln p -0.900) "
        "where its own log-probs put ' Paris' first (ln p -0.500) (it samples, or penalises repeats whatever the "
        "request says)")


def test_requests_go_out_up_to_concurrency_at_once(monkeypatch):
    server = serving(monkeypatch, RecordedServer("vllm"))
    model = load("concurrency=3")
    assert len(model.generate(["a", "b", "c", "d", "e"], 2)) == 5
    assert model.hardware()["concurrency"] == 3


def test_each_finished_request_moves_the_runs_bar(monkeypatch):
    serving(monkeypatch, RecordedServer("vllm"))
    model = load("concurrency=3")
    reported = []
    monkeypatch.setattr(RunProgress, "items_finished", lambda self, items: reported.append(items))
    with run_progress("t · m", 0, [5], 5) as run, run.batch():
        model.generate(["a", "b", "c", "d", "e"], 2)
    assert reported == [1] * 5


# --- the consistency probe and the tokenizer ------------------------------------------------

def test_the_probe_refuses_llama_cpps_echo_logprobs_shifted_by_one_position(monkeypatch):
    """Recorded from llama-cpp-python 0.3.36: ' Berlin' generated at ln p -0.043, and scored
    -11.621 under echo (the distribution after it)."""
    serving(monkeypatch, RecordedServer("llama_cpp"))
    with pytest.raises(UsageError) as refused:
        load("prompt_as=text")
    assert str(refused.value) == (
        "server models.example:8000 fails the consistency probe: it generated ' Berlin' with ln p -0.043 but scores "
        "it at -11.621 in the prompt (logprobs_via=echo): its prompt log-probs are not the model's; give "
        "--model-args logprobs_via=none to only generate with it")


def test_the_probe_passes_scores_within_its_tolerance(monkeypatch):
    server = serving(monkeypatch, RecordedServer("vllm"))
    load()
    echo = server.recorded["echo"]["choices"][0]["logprobs"]["token_logprobs"][PROBE_LENGTH: PROBE_LENGTH + 4]
    told = server.recorded["generation"]["choices"][0]["logprobs"]["token_logprobs"]
    assert 0 < max(abs(a - b) for a, b in zip(echo, told)) <= openai.PROBE_TOLERANCE  # the fixture's noise


def test_a_server_that_only_generates_provides_only_generate(monkeypatch, tmp_path):
    serving(monkeypatch, RecordedServer("llama_cpp"))
    model = load("prompt_as=text,logprobs_via=none")
    assert model.generate_line(["Q"], 3)[0].text == " Paris"
    with pytest.raises(RunError, match="was given logprobs_via=none: it generates, and scores nothing"):
        model.sequence_logprobs([[1, 2]], [1])
    result = CliRunner().invoke(cli, ["run", "--task", "wikitext2", "--method", "none", "--model", URL,
                                      "--model-args", "logprobs_via=none", "--results-dir", str(tmp_path / "r")])
    assert_one_line_exit_2(result, "task 'wikitext2' (language-modelling) needs a model that provides "
                                   "sequence_logprobs", tmp_path / "r")


def test_a_tokenizer_that_is_not_the_servers_is_refused(monkeypatch):
    from raghub.kits.embedded import default_encoder_path

    serving(monkeypatch, RecordedServer("vllm"))
    with pytest.raises(UsageError, match=r"^server models.example:8000 tokenises 'The capital of France.*"
                                         r"give --model-args tokenizer= the served model's$"):
        load_model(URL, model_args=f"tokenizer={default_encoder_path()}")


def test_the_record_names_the_server_the_served_model_and_its_version(monkeypatch):
    serving(monkeypatch, RecordedServer("vllm"))
    hardware = load().hardware()
    assert (hardware["server"], hardware["served_model"], hardware["server_version"]) == \
        ("models.example:8000", "HuggingFaceTB/SmolLM2-135M-Instruct", "0.11.0")
    assert hardware["greedy_fields"] == openai.GREEDY  # vLLM takes repeat_penalty (and ignores it)
    serving(monkeypatch, RecordedServer("openai"))
    assert "server_version" not in load().hardware()  # OpenAI tells none


def test_a_model_the_server_does_not_serve_is_refused(monkeypatch):
    serving(monkeypatch, RecordedServer("openai"))
    with pytest.raises(UsageError, match=r"serves no model 'gpt-9' \(it serves: davinci-002\)"):
        load("model=gpt-9")



@pytest.mark.parametrize("now_serving", [{"id": "HuggingFaceTB/SmolLM2-360M-Instruct"},
                                         {"root": "/models/smollm2-135m-finetuned", "max_model_len": 2048}])
def test_a_server_now_serving_other_weights_is_a_new_run_not_the_stored_one(monkeypatch, tmp_path, now_serving):
    """Regression: a server run was known before its model loaded by the URL and model args
    alone, so once the server at that URL served other weights (another model, or the same name
    for other weights), `raghub run` reused the stored record of the old ones as identical."""
    monkeypatch.setenv("RAGHUB_CACHE", str(tmp_path / "cache"))
    run = ["run", "--task", "squad", "--method", "none", "--limit", "2", "--model", URL,
           "--model-args", f"tokenizer={embedded_gguf()}", "--results-dir", str(tmp_path / "r")]

    def server(**entry):
        recorded = RecordedServer("vllm")
        recorded.recorded["models"]["data"][0].update(entry)
        return serving(monkeypatch, recorded)

    server(created=1733500000)
    assert CliRunner().invoke(cli, run).exit_code == 0
    server(created=1733500999)  # the same weights, asked at another time
    assert "reusing the identical run" in CliRunner().invoke(cli, run).stderr
    server(**now_serving)
    rerun = CliRunner().invoke(cli, run)
    assert rerun.exit_code == 0 and "reusing" not in rerun.stderr
    assert len((tmp_path / "r" / "records.jsonl").read_text().splitlines()) == 2


def test_the_models_fingerprint_names_the_weights_served_and_how_it_scores(monkeypatch):
    """Regression: the loaded model's fingerprint, the key of the LM reranker's cached scores
    and of a run's resume file, named only the served model id and the server's version, so
    other weights served under the same name, or scores got another way, were given the cached
    scores of the old."""
    def fingerprint(model_args="", **entry):
        recorded = RecordedServer("vllm")
        recorded.recorded["models"]["data"][0].update(entry)
        serving(monkeypatch, recorded)
        return load(model_args).fingerprint

    first = fingerprint()
    assert fingerprint(created=1733500999) == first  # the same weights, asked at another time
    others = [fingerprint(root="/models/smollm2-135m-finetuned"), fingerprint("logprobs_via=prompt_logprobs")]
    assert len({first, *others}) == 3

# --- failures and retries -------------------------------------------------------------------

def failing_first(count: int, response):
    """A `fail` that answers the first `count` completions requests with `response()`."""
    calls = []

    def fail(request):
        if request.url.path.endswith("/completions") and len(calls) < count:
            calls.append(request)
            return response(request)
        return None
    return fail


@pytest.mark.parametrize("status", [429, 500, 503])
def test_busy_or_failing_answers_are_retried(monkeypatch, status):
    serving(monkeypatch, RecordedServer("vllm", fail=failing_first(2, lambda r: httpx.Response(status))))
    assert load("max_retries=2").name == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_timeouts_are_retried_and_then_reported_in_one_line(monkeypatch):
    def timeout(request):
        raise httpx.ReadTimeout("timed out", request=request)

    serving(monkeypatch, RecordedServer("vllm", fail=failing_first(1, timeout)))
    load("max_retries=1")
    serving(monkeypatch, RecordedServer("vllm", fail=failing_first(3, timeout)))
    with pytest.raises(UsageError, match=r"^server models.example:8000: POST completions failed after 3 attempts: "
                                         r"timed out$"):
        load("max_retries=2")


def test_a_client_error_is_not_retried(monkeypatch):
    server = serving(monkeypatch, RecordedServer("vllm", fail=failing_first(9, lambda r: httpx.Response(
        400, json={"object": "error", "message": "prompt is too long\nmore", "type": "BadRequestError"}))))
    with pytest.raises(UsageError, match=r"failed after 1 attempt: HTTP 400: prompt is too long$"):
        load("max_retries=5")
    assert len(completions(server)) == 1


def test_malformed_json_is_one_line(monkeypatch):
    serving(monkeypatch, RecordedServer("vllm", fail=failing_first(1, lambda r: httpx.Response(200, text="{oops"))))
    with pytest.raises(UsageError, match="answered POST completions with malformed JSON"):
        load()


def test_a_server_that_is_down_is_refused_before_the_run_in_one_line(monkeypatch, tmp_path):
    def down(request):
        raise httpx.ConnectError("Connection refused", request=request)

    serving(monkeypatch, RecordedServer("vllm", fail=down))
    result = CliRunner().invoke(cli, ["run", "--task", "squad", "--method", "none", "--limit", "2", "--model", URL,
                                      "--model-args", f"tokenizer={embedded_gguf()},max_retries=0",
                                      "--results-dir", str(tmp_path / "r")])
    assert_one_line_exit_2(result, "server models.example:8000: GET models failed after 1 attempt: cannot be "
                                   "reached (ConnectError: Connection refused)", tmp_path / "r")


def test_a_server_that_dies_mid_run_exits_1_keeping_finished_examples_and_the_rerun_resumes(monkeypatch, tmp_path):
    results = tmp_path / "r"
    run = ["run", "--task", "squad", "--method", "none", "--limit", "4", "--batch-size", "2", "--model", URL,
           "--model-args", f"tokenizer={embedded_gguf()},max_retries=0", "--results-dir", str(results)]
    answered = []

    def dies_after_probe_and_a_batch(request):
        body = json.loads(request.content) if request.method == "POST" else {}
        if body and answering(body):
            answered.append(request)
            if len(answered) > 2:
                raise httpx.ConnectError("Connection refused", request=request)
        return None

    monkeypatch.setenv("RAGHUB_CACHE", str(tmp_path / "cache"))
    serving(monkeypatch, RecordedServer("vllm", fail=dies_after_probe_and_a_batch))
    died = CliRunner().invoke(cli, run)
    assert died.exit_code == 1
    assert died.output.strip().splitlines()[-1:] == ["Error: server models.example:8000: POST completions failed "
                                                     "after 1 attempt: cannot be reached (ConnectError: Connection "
                                                     "refused)"]
    [partial] = (results / ".partial").iterdir()
    assert len(partial.read_text().splitlines()) == 1  # the first batch of two is kept
    server = serving(monkeypatch, RecordedServer("vllm"))
    resumed = CliRunner().invoke(cli, run)
    assert resumed.exit_code == 0, resumed.output
    asked = [body for body in completions(server) if answering(body)]
    assert len(asked) == 2  # only the two examples not finished
    record = json.loads((results / "records.jsonl").read_text().splitlines()[-1])
    assert record["n_examples"] == 4


# --- the API key ----------------------------------------------------------------------------

def test_the_api_key_is_sent_and_never_written(monkeypatch, tmp_path):
    key = "sk-test-b6f1e0c4d2"
    monkeypatch.setenv("RAGHUB_TEST_KEY", key)
    monkeypatch.setenv("RAGHUB_CACHE", str(tmp_path / "cache"))
    server = serving(monkeypatch, RecordedServer("vllm"))
    result = CliRunner().invoke(cli, ["run", "--task", "squad", "--method", "none", "--limit", "2", "--model", URL,
                                      "--model-args", f"tokenizer={embedded_gguf()},api_key_env=RAGHUB_TEST_KEY",
                                      "--results-dir", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert {request.headers["authorization"] for request in server.requests} == {f"Bearer {key}"}
    assert key not in result.output
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert written and not [path for path in written if key.encode() in path.read_bytes()]
    assert "RAGHUB_TEST_KEY" in (tmp_path / "r" / "records.jsonl").read_text()  # the variable's name only


def test_an_api_key_variable_that_is_not_set_is_refused_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.delenv("RAGHUB_NO_SUCH_KEY", raising=False)
    result = CliRunner().invoke(cli, ["run", "--task", "squad", "--method", "none", "--model", URL,
                                      "--model-args", "api_key_env=RAGHUB_NO_SUCH_KEY",
                                      "--results-dir", str(tmp_path / "r")])
    assert_one_line_exit_2(result, "the environment variable RAGHUB_NO_SUCH_KEY is not set", tmp_path / "r")


# --- capabilities ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["parametric", "device-cloud"])
def test_methods_that_need_in_process_weights_are_refused_before_the_run(tmp_path, method, model_never_loads):
    result = CliRunner().invoke(cli, ["run", "--task", "squad", "--method", method, "--model", URL,
                                      "--results-dir", str(tmp_path / "r")])
    assert_one_line_exit_2(result, f"method '{method}' needs a model that provides weights", tmp_path / "r")
    assert "model backend 'openai' provides only continuation_logprobs, generate, sequence_logprobs" in result.output


def test_training_through_a_server_is_refused_before_anything_loads(tmp_path, model_never_loads):
    result = CliRunner().invoke(cli, ["train", "--task", "squad", "--model", URL, "--output", str(tmp_path / "r")])
    assert_one_line_exit_2(result, "raghub train needs a model that provides answer_scores", tmp_path / "r")
