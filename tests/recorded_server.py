"""A stand-in for an OpenAI-compatible completions server, answering from the response JSON in
tests/recorded_servers/ (vLLM's and OpenAI's documented shapes, written by hand; llama.cpp's
recorded from its server), through an httpx MockTransport."""

import copy
import json
from pathlib import Path

import httpx

from raghub.plugins.models import huggingface

RECORDED = Path(__file__).parent / "recorded_servers"
#: what any prompt other than the recorded probe prompt gets as its greedy continuation
OTHER_ANSWER = {"text": " Paris", "tokens": [" Paris"], "token_logprobs": [-0.5], "top_logprobs": [{" Paris": -0.5}]}


def embedded_gguf() -> str:
    """The embedded SmolLM2 GGUF file (its tokenizer is the recorded servers')."""
    return str(huggingface.embedded_gguf())


class RecordedServer:
    """Serves `GET /v1/models`, `GET /version` (where the recording has one) and `POST
    /v1/completions`: echo and prompt_logprobs for any prefix of the recorded sequence, the
    recorded generation for the probe prompt (the first 12 tokens); a completions request with a
    field the recording's `request_fields` lacks gets OpenAI's HTTP 400. Every request is kept in
    `requests`; `fail` (request -> response or None) may answer first."""

    def __init__(self, name: str, fail=None):
        self.recorded = json.loads((RECORDED / f"{name}.json").read_text())
        self.ids = self.recorded["sequence_ids"]
        self.pieces = self.recorded["echo"]["choices"][0]["logprobs"]["tokens"][: len(self.ids)]
        self.requests: list[httpx.Request] = []
        self.fail = fail
        self.transport = httpx.MockTransport(self)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        failed = self.fail(request) if self.fail else None
        if failed is not None:
            return failed
        if request.method == "GET":
            answer = {"/v1/models": self.recorded["models"], "/version": self.recorded["version"]}.get(request.url.path)
            return httpx.Response(200, json=answer) if answer else httpx.Response(404, json={"detail": "Not Found"})
        body = json.loads(request.content)
        unknown = sorted(set(body) - set(self.recorded.get("request_fields") or body))
        if unknown:
            return httpx.Response(400, json={"error": {
                "message": f"Unrecognized request argument supplied: {', '.join(unknown)}",
                "type": "invalid_request_error", "param": None, "code": None}})
        pieces, known = self.prompt_pieces(body["prompt"])
        if body.get("echo"):
            return httpx.Response(200, json=self.echo(pieces, known))
        if "prompt_logprobs" in body:
            response = copy.deepcopy(self.recorded["prompt_logprobs"])
            response["choices"][0]["prompt_logprobs"] = response["choices"][0]["prompt_logprobs"][: len(pieces)]
            return httpx.Response(200, json=response)
        response = copy.deepcopy(self.recorded["generation"])
        if not (known and len(pieces) == 12):
            response["choices"][0].update(text=OTHER_ANSWER["text"], finish_reason="stop",
                                          logprobs={**response["choices"][0]["logprobs"], **OTHER_ANSWER})
        return httpx.Response(200, json=response)

    def prompt_pieces(self, prompt) -> tuple[list[str], bool]:
        """What the server reads a prompt (token ids, or text) as, and whether it is a prefix of
        the recorded sequence."""
        if isinstance(prompt, str):
            n = next((n for n in range(len(self.pieces) + 1) if "".join(self.pieces[:n]) == prompt), None)
            return (self.pieces[:n], True) if n is not None else (list(prompt), False)
        vocabulary = dict(zip(self.ids, self.pieces))
        return [vocabulary.get(token, f"<{token}>") for token in prompt], prompt == self.ids[: len(prompt)]

    def echo(self, pieces: list[str], known: bool) -> dict:
        """The recorded echo cut to the prompt's tokens (the recorded generated entries kept after
        them); a prompt not in the recording scores -1 at every token."""
        response = copy.deepcopy(self.recorded["echo"])
        logprobs = response["choices"][0]["logprobs"]
        generated = {key: values[len(self.ids):] for key, values in logprobs.items()}
        scored = logprobs["token_logprobs"][: len(pieces)] if known else [None] + [-1.0] * (len(pieces) - 1)
        logprobs.update(tokens=pieces + generated["tokens"], token_logprobs=scored + generated["token_logprobs"],
                        top_logprobs=[None] * len(pieces) + generated["top_logprobs"],
                        text_offset=list(range(len(pieces))) + generated["text_offset"])
        return response
