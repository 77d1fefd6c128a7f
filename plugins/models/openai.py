"""The `openai` model backend: a model behind an OpenAI-compatible completions server (vLLM,
llama.cpp, SGLang, TGI), given by its `/v1` base URL.

Prompts go to `/v1/completions` as raghub's token ids (`prompt_as=text` for a server that takes
only text, checked to tokenise alike), greedily (`GREEDY`: temperature 0 and repeat_penalty 1, the
latter left out for a server that refuses it), and each generation is checked to be greedy by the
server's own log-probs. A sequence is scored from the prompt log-probs the server echoes (`echo:
true`) or from vLLM's `prompt_logprobs`. Before a model is handed out, a probe checks that the
server tokenises as the local tokenizer does, that it generates greedily, and that its prompt
log-probs agree with its own generation log-probs (`probe`): a server whose scoring is shifted,
or which lacks log-probs, is refused in one line.
"""

from __future__ import annotations

import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence
from urllib.parse import urlsplit

from raghub import (Generation, LanguageModel, ModelBackend, ModelProgress, Option, RunError, UsageError, fingerprint,
                    hookimpl)

#: what the probe generates from and then scores
PROBE_PROMPT = "The capital of France is Paris. The capital of Germany is"
PROBE_TOKENS = 4
#: a prompt whose greedy continuation repeats it, which a server that penalises repeats departs from
REPEAT_PROBE_PROMPT = "one two three one two three one two three one two"
#: what every completion is sent with so that the server picks each most likely token: temperature
#: 0 and no repeat penalty (llama.cpp's servers penalise repeats even at temperature 0,
#: llama-cpp-python's by default with 1.1; vLLM and SGLang ignore the field and penalise nothing
#: unless asked by their own `repetition_penalty`; OpenAI's API refuses it, and is then not sent it)
GREEDY = {"temperature": 0, "repeat_penalty": 1.0}
#: how far a generated token's ln p may lie below the best its own top log-probs name (nats; ties)
GREEDY_TOLERANCE = 1e-3
#: the most a prompt log-prob may differ from the generation log-prob of the same token (nats)
PROBE_TOLERANCE = 0.1
#: HTTP statuses worth asking again after a pause
RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: the first pause before a retry (seconds); each next one doubles
FIRST_BACKOFF = 0.5
#: what a `/v1/models` entry says of the weights served (its other fields, such as vLLM's
#: `created` and `permission`, change from one request to the next)
SERVED_IDENTITY = ("id", "root", "parent", "max_model_len", "owned_by", "meta")


class Refused(RunError):
    """A request the server refused with a client error (4xx other than 408 and 429), which asking
    again would not change; `problem` is its status and the error it gave."""

    def __init__(self, message: str, problem: str):
        super().__init__(message)
        self.problem = problem


def first_line(text: str) -> str:
    """The first non-blank line of `text`, at most 200 characters ('' when none)."""
    return next((line.strip()[:200] for line in text.splitlines() if line.strip()), "")


def server_problem(response) -> str:
    """The status of a failed response and the first line of the error the server gave with it
    (OpenAI's and vLLM's `{"error": {"message": ...}}`, vLLM's `{"message": ...}`, or the text)."""
    try:
        answer = response.json()
        error = answer.get("error", answer) if isinstance(answer, dict) else answer
        message = error.get("message", error) if isinstance(error, dict) else error
    except ValueError:
        message = response.text
    return f"HTTP {response.status_code}: {first_line(str(message)) or response.reason_phrase}"


class CompletionsClient:
    """Requests to one server: JSON in and out, with retries and back-off on 429, 5xx and
    timeouts; a failure is a RunError in one line naming the server's host."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float, max_retries: int, transport=None):
        import httpx

        self.host = urlsplit(base_url).netloc
        self.max_retries = max_retries
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout,
                                 transport=transport)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, body)

    def get_if_there(self, path: str) -> dict[str, Any] | None:
        """The JSON of a GET, None when the server has no such endpoint (or no JSON there)."""
        try:
            answer = self.request("GET", path)
        except RunError:
            return None
        return answer if isinstance(answer, dict) else None

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The JSON answer; a RunError once the request failed `max_retries` + 1 times (a client
        error such as HTTP 400 is not asked again: a Refused)."""
        import httpx

        for attempt in itertools.count():
            retried, refused = True, False
            try:
                response = self.http.request(method, path, json=body)
            except httpx.TimeoutException:
                problem = "timed out"
            except httpx.TransportError as error:
                problem = f"cannot be reached ({type(error).__name__}: {first_line(str(error))})"
            else:
                if response.is_success:
                    try:
                        return response.json()
                    except ValueError:
                        raise RunError(f"server {self.host} answered {method} {path} with malformed JSON") from None
                problem = server_problem(response)
                retried = response.status_code in RETRIED_STATUSES
                refused = response.is_client_error and not retried
            if attempt == self.max_retries or not retried:
                message = (f"server {self.host}: {method} {path} failed after {attempt + 1} "
                           f"attempt{'' if attempt == 0 else 's'}: {problem}")
                raise Refused(message, problem) if refused else RunError(message)
            time.sleep(FIRST_BACKOFF * 2**attempt)


def first_choice(response: dict[str, Any], host: str) -> dict[str, Any]:
    """The first choice of a completions response; a RunError when it has none."""
    choices = response.get("choices") if isinstance(response, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise RunError(f"server {host} answered /completions without choices")
    return choices[0]


def choice_logprobs(choice: dict[str, Any], host: str) -> dict[str, Any]:
    """The `logprobs` object of a choice; a RunError when the server gave none."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("token_logprobs"), list):
        raise RunError(f"server {host} returned no log-probs (asked with logprobs: 1); raghub needs a server "
                       "that returns them")
    return logprobs


def passed_over(logprobs: dict[str, Any]) -> str | None:
    """How a generation was not greedy: the first generated token that the server's own top
    log-probs rank below another; None when each was the most likely (or no top log-probs came)."""
    tops = logprobs.get("top_logprobs") or []
    for token, value, top in zip(logprobs.get("tokens") or [], logprobs["token_logprobs"], tops):
        if not isinstance(top, dict) or not top or value is None:
            continue
        best, best_value = max(top.items(), key=lambda item: item[1])
        if value < best_value - GREEDY_TOLERANCE:
            return f"it generated {token!r} (ln p {value:.3f}) where its own log-probs put {best!r} first (ln p {best_value:.3f})"
    return None


def through_first_line(choice: dict[str, Any]) -> dict[str, Any]:
    """`choice` cut at the first newline after non-space text, as the in-process backend's
    `generate_line` stops: its text through that newline, its log-probs through the token that
    wrote it; unchanged when it has no such newline or the server named no tokens."""
    logprobs = choice.get("logprobs")
    pieces = logprobs.get("tokens") if isinstance(logprobs, dict) else None
    written = ""
    for count, piece in enumerate(pieces or [], 1):
        written += str(piece)
        if "\n" in written.lstrip():
            text = choice.get("text", "")
            end = text.find("\n", len(text) - len(text.lstrip()))
            cut = {key: values[:count] for key, values in logprobs.items() if isinstance(values, list)}
            return {**choice, "text": text[: end + 1] if end >= 0 else text, "logprobs": {**logprobs, **cut}}
    return choice


def served_identity(served: dict[str, Any]) -> dict[str, Any]:
    """The fields of a `/v1/models` entry that name the weights served (`SERVED_IDENTITY`)."""
    return {key: served[key] for key in SERVED_IDENTITY if key in served}


def load_tokenizer(spec: str):
    """A transformers tokenizer from a hub id, a folder or the tokenizer inside a .gguf file."""
    from transformers import AutoTokenizer

    path = Path(spec).expanduser()
    try:
        if spec.endswith(".gguf"):
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else spec)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"--model-args tokenizer={spec} cannot be loaded "
                         f"({first_line(str(error)) or type(error).__name__})") from None


class ServerLM(LanguageModel):
    """A model served by an OpenAI-compatible completions server, with a local tokenizer that
    must be the server's. `served` is what `/v1/models` said of the model (its id, and
    `max_model_len` where the server tells it); `version` the server's, where it tells one. Its
    fingerprint names both, the tokenizer, and how prompts are scored (`logprobs_via`, `prompt_as`).
    `greedy_fields` is what every completion is sent with (`GREEDY`, less what the probe found
    the server refuses)."""

    def __init__(self, client: CompletionsClient, tokenizer, served: dict[str, Any], version: str | None,
                 settings: dict[str, Any], batch_size: int = 8):
        self.client = client
        self.model_id = served["id"]
        self.context = served.get("max_model_len")
        self.version = version
        self.settings = settings
        self.greedy_fields = dict(GREEDY)
        super().__init__(tokenizer, self.model_id, batch_size,
                         fingerprint(client.host, served_identity(served), version, settings["tokenizer"], len(tokenizer),
                                     settings["logprobs_via"], settings["prompt_as"]))

    @property
    def device(self):
        import torch

        return torch.device("cpu")  # where the scores it returns live

    @property
    def dtype(self) -> str:
        return "as served"

    def max_input_tokens(self, new_tokens: int = 0) -> int | None:
        return None if self.context is None else self.context - new_tokens

    def hardware(self) -> dict[str, Any]:
        return {"device": "server", "dtype": self.dtype, "server": self.client.host, "served_model": self.model_id,
                **({"server_version": self.version} if self.version else {}),
                "concurrency": self.settings["concurrency"], "greedy_fields": self.greedy_fields}

    def _parallel(self, work: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """`work` of each item, up to `concurrency` requests at once, in order; each reported to the
        run's progress bar as it finishes."""
        progress = ModelProgress(len(items))

        def reported(item: Any) -> Any:
            result = work(item)
            progress.advance(1)
            return result

        with ThreadPoolExecutor(max_workers=self.settings["concurrency"]) as pool:
            return list(pool.map(reported, items))

    def _prompt(self, ids: Sequence[int]) -> list[int] | str:
        """`ids` as sent: the ids, or (`prompt_as=text`) their text, special tokens such as a chat
        template's written out, as the server reads them back."""
        if self.settings["prompt_as"] == "tokens":
            return list(ids)
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def _complete(self, ids: Sequence[int], **request: Any) -> dict[str, Any]:
        body = {"model": self.model_id, "prompt": self._prompt(ids), **self.greedy_fields, **request}
        return first_choice(self.client.post("completions", body), self.client.host)

    def prompt_logprobs(self, ids: Sequence[int]) -> list[float | None]:
        """ln p of each token of `ids` after those before it, as the server scores them (None at
        position 0), by `logprobs_via`."""
        host = self.client.host
        if self.settings["logprobs_via"] == "none":
            raise RunError(f"server {host} was given logprobs_via=none: it generates, and scores nothing")
        if self.settings["prompt_as"] == "text" and self.encode(self._prompt(ids)) != list(ids):
            raise RunError(f"server {host}: prompt_as=text cannot score {len(ids)} tokens whose text "
                           f"{first_line(self.decode(ids))[:40]!r} tokenises otherwise (a character cut in two, "
                           "or a special token): the server would score other tokens; give --model-args "
                           "prompt_as=tokens")
        if self.settings["logprobs_via"] == "prompt_logprobs":
            entries = self._complete(ids, max_tokens=1, prompt_logprobs=0).get("prompt_logprobs")
            if not isinstance(entries, list) or len(entries) < len(ids):
                raise RunError(f"server {host} returned no prompt_logprobs for {len(ids)} prompt tokens "
                               "(vLLM takes it; give logprobs_via=echo for another server)")
            scored = [None] + [entry.get(str(token), {}).get("logprob") if isinstance(entry, dict) else None
                               for entry, token in zip(entries[1:len(ids)], ids[1:])]
        else:
            scored = choice_logprobs(self._complete(ids, max_tokens=1, logprobs=1, echo=True), host)["token_logprobs"]
            if len(scored) < len(ids):
                raise RunError(f"server {host} echoed {len(scored)} log-probs for {len(ids)} prompt tokens: it "
                               "tokenises differently (is --model-args tokenizer the served model's?)")
        missing = next((position for position in range(1, len(ids)) if not isinstance(scored[position], (int, float))),
                       None)
        if missing is not None:
            raise RunError(f"server {host} returned no log-prob for prompt token {missing} of {len(ids)} "
                           f"(logprobs_via={self.settings['logprobs_via']})")
        return scored[: len(ids)]

    def sequence_logprobs(self, sequences: Sequence[Sequence[int]], starts: Sequence[int]) -> list[Any]:
        import torch

        scored = self._parallel(self.prompt_logprobs, sequences)
        return [torch.tensor(values[start:], dtype=torch.float32) for values, start in zip(scored, starts)]

    def _generation(self, ids: Sequence[int], max_new_tokens: int, one_line: bool) -> Generation:
        """A greedy continuation of `ids`; one-line ones stop at a newline, unless the newline
        comes first (then the text to its first newline after non-space text, as in-process)."""
        choice = self._complete(ids, max_tokens=max_new_tokens, logprobs=1, **({"stop": ["\n"]} if one_line else {}))
        if one_line and not choice.get("text", "").strip() and choice.get("finish_reason") == "stop":
            choice = through_first_line(self._complete(ids, max_tokens=max_new_tokens, logprobs=1))
        logprobs = choice_logprobs(choice, self.client.host)
        problem = passed_over(logprobs)
        if problem:
            raise RunError(f"server {self.client.host} does not generate greedily at temperature 0: {problem} (it "
                           "samples, or penalises repeats whatever the request says)")
        text = choice.get("text", "")
        return Generation(text=text, token_logprobs=[float(v) for v in logprobs["token_logprobs"]],
                          token_ids=self.generated_ids(logprobs.get("tokens") or [], text))

    def generated_ids(self, pieces: Sequence[str], text: str) -> list[int]:
        """The ids of the generated tokens the server names by their text (`pieces`): each
        piece's one id, else (a piece that is part of a character) the ids of `text`."""
        ids = [self.encode(piece) for piece in pieces]
        return [own[0] for own in ids] if all(len(own) == 1 for own in ids) else self.encode(text)

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[Generation]:
        return self._parallel(lambda prompt: self._generation(self.encode(prompt), max_new_tokens, False), prompts)

    def generate_line(self, prompts: Sequence[str], max_new_tokens: int) -> list[Generation]:
        return self._parallel(lambda prompt: self._generation(self.encode(prompt), max_new_tokens, True), prompts)

    def first_completion(self, ids: Sequence[int], **request: Any) -> dict[str, Any]:
        """The probe's first completion; a server that refuses `repeat_penalty` (OpenAI's API
        refuses a field it does not know) is asked again, and from then on, without it."""
        try:
            return self._complete(ids, **request)
        except Refused as refusal:
            if "repeat_penalty" not in refusal.problem:
                raise
        del self.greedy_fields["repeat_penalty"]
        return self._complete(ids, **request)

    def probe(self) -> None:
        """A RunError in one line unless the server tokenises `PROBE_PROMPT` as the local
        tokenizer does, continues `REPEAT_PROBE_PROMPT` greedily, and scores greedy tokens of its
        own, in the prompt, with the log-probs it gave them when it generated them (within
        `PROBE_TOLERANCE`)."""
        host = self.client.host
        ids = self.encode(PROBE_PROMPT)
        echo = self.first_completion(ids, max_tokens=1, logprobs=1, echo=True)
        echoed = choice_logprobs(echo, host).get("tokens") or []
        ours = [self.decode([token]) for token in ids]
        if [str(piece) for piece in echoed[: len(ids)]] not in (ours, self.tokenizer.convert_ids_to_tokens(ids)):
            raise RunError(f"server {host} tokenises {PROBE_PROMPT!r} as {echoed[: len(ids) + 1]}, the tokenizer "
                           f"{self.settings['tokenizer']} as {ours}: give --model-args tokenizer= the served model's")
        self._generation(self.encode(REPEAT_PROBE_PROMPT), 2 * PROBE_TOKENS, one_line=False)
        generated = self._generation(ids, PROBE_TOKENS, one_line=False)
        told = generated.token_logprobs
        if self.settings["logprobs_via"] == "none":
            return
        continuation = self.encode(generated.text)
        count = min(len(told), len(continuation))
        if not count:
            raise RunError(f"server {host} generated nothing after the probe prompt {PROBE_PROMPT!r}")
        scored = self.prompt_logprobs(ids + continuation)[len(ids): len(ids) + count]
        for position, (given, rescored) in enumerate(zip(told, scored)):
            if abs(given - rescored) > PROBE_TOLERANCE:
                token = self.decode([continuation[position]])
                raise RunError(
                    f"server {host} fails the consistency probe: it generated {token!r} with ln p {given:.3f} but "
                    f"scores it at {round(rescored, 3)} in the prompt "
                    f"(logprobs_via={self.settings['logprobs_via']}): its prompt log-probs are not the model's; "
                    f"give --model-args logprobs_via=none to only generate with it")


class OpenAICompatible(ModelBackend):
    name = "openai"
    description = "a model behind an OpenAI-compatible completions server (vLLM, llama.cpp, SGLang, TGI)"
    handles_description = "the server's /v1 base URL (http:// or https://)"
    provides = frozenset({"generate", "sequence_logprobs", "continuation_logprobs"})
    options = {
        "model": Option(str, None, "the served model id (default: the first the server lists)"),
        "tokenizer": Option(str, None, "a hub id, folder or .gguf file with the served model's tokenizer "
                                       "(default: the served model id)"),
        "api_key_env": Option(str, None, "the environment variable holding the API key (never recorded)"),
        "concurrency": Option(int, 4, "requests in flight at once", at_least=1),
        "timeout": Option(float, 120.0, "seconds to wait for one response", above=0),
        "max_retries": Option(int, 3, "retries of a request after 429, 5xx or a timeout, with back-off",
                              at_least=0),
        "logprobs_via": Option(("echo", "prompt_logprobs", "none"), "echo",
                               "how prompts are scored: echo (any server), vLLM's prompt_logprobs, or none "
                               "(generation only, for a server whose prompt log-probs fail the probe)"),
        "prompt_as": Option(("tokens", "text"), "tokens", "prompts sent as raghub's token ids, or as text "
                                                          "(for a server that takes no token ids)"),
    }
    #: the httpx transport requests go through (None: the network); tests put a MockTransport here
    transport: ClassVar[Any] = None

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.settings["logprobs_via"] == "none":
            self.provides = frozenset({"generate"})

    @classmethod
    def handles(cls, spec: str | None) -> bool:
        return spec is not None and spec.startswith(("http://", "https://"))

    def check(self, spec: str | None) -> None:
        if not self.handles(spec):
            raise UsageError(f"model backend 'openai' needs --model http(s)://HOST:PORT/v1, not {spec!r}")
        variable = self.settings["api_key_env"]
        if variable and not os.environ.get(variable):
            raise UsageError(f"--model-args api_key_env={variable}: the environment variable {variable} is not set")

    def content_identity(self, spec: str | None) -> str | None:
        """What the server says it serves now (`SERVED_IDENTITY` of the model's `/v1/models`
        entry, and its version), so that other weights served at the same URL are a new run, not
        the stored run of the old ones; a server that cannot be asked is a UsageError."""
        client = self.client(spec)
        try:
            served = self.served_model(client)
        except RunError as error:
            raise UsageError(str(error)) from None
        return fingerprint(served_identity(served), self.server_version(client, spec))

    def client(self, spec: str) -> CompletionsClient:
        """A client of the server at `spec`, with the API key from the environment variable named."""
        settings = self.settings
        api_key = os.environ.get(settings["api_key_env"]) if settings["api_key_env"] else None
        return CompletionsClient(spec, api_key, settings["timeout"], settings["max_retries"], self.transport)

    @staticmethod
    def server_version(client: CompletionsClient, spec: str) -> str | None:
        """The version the server tells at `/version`, where it tells one."""
        return (client.get_if_there(f"{urlsplit(spec).scheme}://{client.host}/version") or {}).get("version")

    def load(self, spec: str | None, device: str | None, dtype: str, batch_size: int) -> ServerLM:
        """The served model, once the server answers and passes the probe; else a UsageError."""
        self.check(spec)
        settings = self.settings
        client = self.client(spec)
        try:
            served = self.served_model(client)
            tokenizer = load_tokenizer(settings["tokenizer"] or served["id"])
            version = self.server_version(client, spec)
            model = ServerLM(client, tokenizer, served, version,
                             {**settings, "tokenizer": settings["tokenizer"] or served["id"]}, batch_size)
            model.probe()
        except RunError as error:
            raise UsageError(str(error)) from None
        return model

    def served_model(self, client: CompletionsClient) -> dict[str, Any]:
        """What `/v1/models` says of the model to use (`model=`, else the first listed)."""
        listed = client.request("GET", "models")
        models = [entry for entry in (listed.get("data") or [] if isinstance(listed, dict) else []) if isinstance(entry, dict) and "id" in entry]
        wanted = self.settings["model"]
        if wanted is None:
            if not models:
                raise RunError(f"server {client.host} lists no model at /models")
            return models[0]
        chosen = next((entry for entry in models if entry["id"] == wanted), None)
        if chosen is None and models:
            raise RunError(f"server {client.host} serves no model {wanted!r} (it serves: "
                           f"{', '.join(entry['id'] for entry in models)})")
        return chosen or {"id": wanted}


@hookimpl
def register_models(register):
    register(OpenAICompatible)
