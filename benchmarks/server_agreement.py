"""Whether SQuAD answers through a llama.cpp server are the in-process `gguf` backend's:
`incontext` and `none` on the first questions, both ways in one process on the same prompts.

    python -m llama_cpp.server --model "$(python benchmarks/server_throughput.py --gguf)" --port 8080 --n_ctx 2048 &
    RAGHUB_DATA_DIR=../shared/data python benchmarks/server_agreement.py --server http://127.0.0.1:8080/v1

Each method runs once through the server (the `openai` backend, generation only) and once
in-process (`--dtype`), each with an empty cache. Prints one JSON line per method: the
questions; how many predictions are the same both ways, and their share; over the questions
whose generated tokens are the same both ways, |ln p server - ln p in-process| of
each of those tokens (mean, p95, max, in nats); and for each question whose tokens part, the
in-process margin ln p(its own token) - ln p(the server's token) at the first parting point,
both scored in-process after the tokens the two share (near 0: a near-tie that the server's
quantised arithmetic can tip). With `--engine-check`, also how many of the server's
continuations llama.cpp itself gives in this process (`llama_cpp.Llama`, the same GGUF). Then a
short summary. `--gguf` names the file the server serves when it is not the embedded SmolLM2
(in-process loads that file too): `float32_gguf.py` writes one on which both engines compute
the same function.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from raghub import Generation, LanguageModel
from raghub.cache import Cache
from raghub.models import load_model
from raghub.plugin_manager import default_host
from raghub.plugins.models.huggingface import embedded_gguf
from raghub.resolution import resolve_sweep
from raghub.runner import execute

METHODS = ("incontext", "none")


def recorded_generations(model: LanguageModel) -> dict[str, Generation]:
    """A dict that, from now on, holds the Generation `model.generate_line` returns for each
    prompt (what `incontext` and `none` answer with)."""
    generations: dict[str, Generation] = {}
    generate_line = model.generate_line

    def recording(prompts, max_new_tokens):
        result = generate_line(prompts, max_new_tokens)
        generations.update(zip(prompts, result))
        return result

    model.generate_line = recording
    return generations


def predictions(method: str, questions: int, model: LanguageModel, model_settings: dict[str, Any],
                results: Path) -> dict[str, str]:
    """Each question's prediction from one run of `method` on SQuAD with `model`, with an empty cache."""
    settings = {"task": "squad", "method": method, "limit": questions, "results_dir": str(results), **model_settings}
    (resolved,) = resolve_sweep(settings, default_host())
    with tempfile.TemporaryDirectory() as cache_dir:
        record = execute(resolved, model, Cache(Path(cache_dir)))
    lines = (results / record.samples).read_text().splitlines()
    return {line["id"]: line["prediction"] for line in map(json.loads, lines)}


def parting_margin(model: LanguageModel, prompt: str, own: Generation, served: Generation) -> float | None:
    """ln p(own token) - ln p(served token), both by `model` after `prompt` and the tokens the two
    generations share; None when they do not part at a token (the same, or one stops first)."""
    shared = len(os.path.commonprefix([own.token_ids, served.token_ids]))
    if shared == min(len(own.token_ids), len(served.token_ids)):
        return None
    context = model.encode(prompt) + own.token_ids[:shared]
    candidates = [context + [own.token_ids[shared]], context + [served.token_ids[shared]]]
    own_logprob, served_logprob = (values[-1].item() for values in
                                   model.sequence_logprobs(candidates, [len(context)] * 2))
    return own_logprob - served_logprob


def spread(differences: list[float]) -> dict[str, float]:
    """Mean, 95th percentile and largest of `differences` (nothing when there are none)."""
    if not differences:
        return {}
    return {"mean": round(float(np.mean(differences)), 4), "p95": round(float(np.percentile(differences, 95)), 4),
            "max": round(float(np.max(differences)), 4)}


def agreement(method: str, own: dict[str, str], served: dict[str, str], own_generations: dict[str, Generation],
              served_generations: dict[str, Generation], model: LanguageModel) -> dict[str, Any]:
    """The JSON line of one method (see the module's docstring): `own` and `served` are the
    predictions by question, the generations by prompt, `model` the in-process one."""
    same_answers = sum(own[key] == served[key] for key in own)
    differences, margins, same_tokens = [], [], 0
    for prompt, generation in own_generations.items():
        other = served_generations[prompt]
        if generation.token_ids == other.token_ids:
            same_tokens += 1
            differences += [abs(a - b) for a, b in zip(generation.token_logprobs, other.token_logprobs)]
        else:
            margins.append(parting_margin(model, prompt, generation, other))
    parting = sorted(round(margin, 4) for margin in margins if margin is not None)
    return {"method": method, "questions": len(own), "same_answers": same_answers,
            "same_answers_share": round(same_answers / len(own), 3), "same_tokens": same_tokens,
            "logprob_difference_nats": {"tokens": len(differences), **spread(differences)},
            "parting_margins_nats": parting, "parted_where_one_stops": len(margins) - len(parting)}


def llama_cpp_in_process(gguf: Path) -> Any:
    """llama.cpp itself on the `gguf` file, in this process (`llama_cpp.Llama`)."""
    from llama_cpp import Llama

    return Llama(model_path=str(gguf), n_ctx=2048, verbose=False)


def same_as_llama_cpp_in_process(engine: Any, served_generations: dict[str, Generation]) -> dict[str, int]:
    """How many of the server's one-line generations llama.cpp itself (`engine`, greedy, no repeat
    penalty) continues with the same text, asked as the `openai` backend asks (stop at a newline;
    blank: asked again without the stop): the same engine's answers, to tell the server path's
    faithfulness from the engines' arithmetic."""

    def continuation(prompt: str, tokens: int) -> str:
        greedy = {"max_tokens": tokens, "temperature": 0, "repeat_penalty": 1.0}
        text = engine.create_completion(prompt, stop=["\n"], **greedy)["choices"][0]["text"]
        return text if text.strip() else engine.create_completion(prompt, **greedy)["choices"][0]["text"]

    same = sum(continuation(prompt, max(len(generation.token_ids), 1)) == generation.text
               for prompt, generation in served_generations.items())
    return {"prompts": len(served_generations), "same_as_llama_cpp_in_process": same}


def summary(row: dict[str, Any]) -> str:
    """One line for a person of a method's JSON line."""
    text = (f"{row['method']}: {row['same_answers']}/{row['questions']} answers the same "
            f"({row['same_answers_share']:.0%}); {row['same_tokens']} questions generate the same tokens")
    difference = row["logprob_difference_nats"]
    if difference["tokens"]:
        text += (f", whose {difference['tokens']} tokens differ in ln p by {difference['mean']:.3f} nats on average, "
                 f"{difference['p95']:.3f} at p95, {difference['max']:.3f} at most")
    margins = row["parting_margins_nats"]
    if margins:
        text += (f"; {len(margins)} part at a token, where the in-process margin is {margins[0]:.3f} to "
                 f"{margins[-1]:.3f} nats (median {float(np.median(margins)):.3f})")
    text += f"; {row['parted_where_one_stops']} part where one stops" if row["parted_where_one_stops"] else ""
    if "engine_check" in row:
        text += (f"; llama.cpp in-process continues {row['engine_check']['same_as_llama_cpp_in_process']} of "
                 f"{row['engine_check']['prompts']} of the server's prompts with the server's text")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="the llama.cpp server's /v1 URL, serving --gguf")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="the GGUF file the server serves, loaded in-process too (default: the embedded SmolLM2)")
    parser.add_argument("--questions", type=int, default=50, help="the first SQuAD questions")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="in-process")
    parser.add_argument("--engine-check", action="store_true",
                        help="also continue the server's prompts with llama.cpp in this process (llama_cpp.Llama)")
    args = parser.parse_args(argv)
    gguf = args.gguf or embedded_gguf()
    served_settings = {"model": args.server, "model_args": f"tokenizer={gguf},prompt_as=text,logprobs_via=none"}
    own_settings = {"dtype": args.dtype, **({"model": str(args.gguf)} if args.gguf else {})}
    server = load_model(args.server, model_args=served_settings["model_args"])
    in_process = load_model(own_settings.get("model"), dtype=args.dtype)
    print(json.dumps({"server": args.server, "gguf": gguf.name, "in_process_dtype": in_process.dtype,
                      "machine": f"{os.cpu_count()} CPUs", "load_average": os.getloadavg()}), flush=True)
    served_generations, own_generations = recorded_generations(server), recorded_generations(in_process)
    engine = llama_cpp_in_process(gguf) if args.engine_check else None
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for method in METHODS:
            served_generations.clear()
            own_generations.clear()
            own = predictions(method, args.questions, in_process, own_settings, Path(scratch) / "own")
            served = predictions(method, args.questions, server, served_settings, Path(scratch) / "served")
            if own_generations.keys() != served_generations.keys():
                raise SystemExit(f"{method}: the two ways built different prompts")
            rows.append(agreement(method, own, served, own_generations, served_generations, in_process))
            if engine is not None:
                rows[-1]["engine_check"] = same_as_llama_cpp_in_process(engine, served_generations)
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"load_average": os.getloadavg()}))
    print()
    print("\n".join(map(summary, rows)))


if __name__ == "__main__":
    main()
