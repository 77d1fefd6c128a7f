"""Tokens per second of raghub's scoring (`none`, `incontext`, `ensemble` on WikiText-2) and QA
generation (SQuAD), side by side in one run with raghub as of commit 83a5fc6 (full float32
logits of every position, batches of 8 in the given order, answers generated to the token
limit), a plain-transformers loop over (window, passage) pairs (DRAGON's way) and, with
`--with-lm-eval SITE`, lm-eval's rolling log-likelihood. Model FLOP utilisation (MFU) is taken
against this machine's matmul rate, measured in the same run.

    RAGHUB_DATA_DIR=../shared/data python benchmarks/speed.py --windows 2 --k 4 --questions 20 \\
        --with-lm-eval /tmp/lmeval-site

`SITE` is a folder holding lm-eval (`pip install --target SITE lm-eval`); it is put on the
path only for that column.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from raghub import Retrieved, load_model, mixture_logprobs, passage_ids
from raghub.cache import Cache, cache_root
from raghub.models import Generation
from raghub.plugin_manager import registry
from raghub.plugins.methods.ensemble import Ensemble
from raghub.plugins.methods.incontext import InContext
from raghub.plugins.methods.none import ClosedBook
from raghub.plugins.models import huggingface
from raghub.plugins.models.huggingface import TransformersLM
from raghub.pretrained import BF16_CPU_FLAGS, cpu_flags
from raghub.plugins.retrievers.bm25 import BM25S
from raghub.plugins.tasks.language_modelling import LanguageModelling
from raghub.plugins.tasks.question_answering.task import QATask
from raghub.runner import retrieve
from raghub.settings import read_task_definition

TASKS = Path(__file__).resolve().parents[1] / "tasks"
METHODS = {"none": ClosedBook, "incontext": InContext, "ensemble": Ensemble}


class At83a5fc6(TransformersLM):
    """raghub's `TransformersLM` as of commit 83a5fc6, kept here to time it beside today's."""

    def sequence_logprobs(self, sequences, starts):
        results = []
        for first in range(0, len(sequences), self.batch_size):
            batch = sequences[first : first + self.batch_size]
            logits, lengths = self.logits(batch)
            for row, seq in enumerate(batch):
                start = starts[first + row]
                end = int(lengths[row])
                step = logits[row, start - 1 : end - 1].float().log_softmax(-1)
                targets = torch.tensor(seq[start:end], device=step.device)
                results.append(step.gather(-1, targets[:, None])[:, 0].cpu())
        return results

    def generate_line(self, prompts, max_new_tokens):
        return self.generate(prompts, max_new_tokens)

    def generate(self, prompts, max_new_tokens):
        generations = []
        self.tokenizer.padding_side = "left"
        for first in range(0, len(prompts), self.batch_size):
            batch = list(prompts[first : first + self.batch_size])
            inputs = self.tokenizer(batch, return_tensors="pt", padding=True,
                                    add_special_tokens=False).to(self.device)
            with torch.inference_mode():
                output = self.hf_model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                    output_scores=True, return_dict_in_generate=True,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new_tokens = output.sequences[:, inputs["input_ids"].shape[1] :]
            scores = torch.stack(output.scores, dim=1).float().log_softmax(-1)
            token_logprobs = scores.gather(-1, new_tokens[..., None])[..., 0]
            stop_ids = {self.tokenizer.pad_token_id, self.tokenizer.eos_token_id}
            for row in range(len(batch)):
                tokens = new_tokens[row].tolist()
                length = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
                generations.append(Generation(text=self.decode(tokens[:length]),
                                              token_logprobs=token_logprobs[row, :length].tolist()))
        return generations


def without_prefix_cache(run):
    """`run()` with the shared-prefix key/value cache of generation turned off."""
    saved, huggingface.MIN_SHARED_PREFIX = huggingface.MIN_SHARED_PREFIX, sys.maxsize
    try:
        return run()
    finally:
        huggingface.MIN_SHARED_PREFIX = saved


def machine() -> str:
    """This machine in words: CPU model, cores, torch threads, bf16 support."""
    model_name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                       if line.startswith("model name")), platform.processor() or platform.machine())
    bf16 = ", ".join(sorted(cpu_flags() & BF16_CPU_FLAGS)) or "no native bf16"
    return (f"{model_name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {bf16}, "
            f"torch {torch.__version__}")


def matmul_rate(dtype: torch.dtype, rows: int = 4096, inner: int = 576, columns: int = 1536) -> float:
    """FLOP/s of a timed [rows, inner] @ [inner, columns] product (the model's MLP shape)."""
    a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, columns, dtype=dtype)
    torch.matmul(a, b)
    repeats, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.5:
        torch.matmul(a, b)
        repeats += 1
    return 2 * rows * inner * columns * repeats / (time.perf_counter() - start)


def scoring_flops(model, lengths, scored: int) -> float:
    """Useful FLOPs of scoring: 2 per decoder weight per token, causal attention, and the
    output head on the scored positions only."""
    config = model.hf_model.config
    weights = sum(p.numel() for name, p in model.hf_model.get_decoder().named_parameters() if "embed" not in name)
    attention = sum(2 * config.num_hidden_layers * config.hidden_size * n * n for n in lengths)
    return 2 * weights * sum(lengths) + attention + 2 * config.hidden_size * model.vocab_size * scored


def prefixes(model, method: str, window, docs) -> list[list[int]]:
    """The prefix of each forward pass `method` makes for `window`: none, the passages joined
    (`incontext`), or one per passage (`ensemble`)."""
    ids = [passage_ids(model, r.passage, window.retrieved_max_length) for r in docs]
    if method == "ensemble":
        return ids
    return [[t for passage in ids for t in passage]]


def plain_logprobs(hf_model, prefix, window):
    """ln p of a window's targets after `prefix` and its context: one plain forward pass."""
    ids = torch.tensor([prefix + window.context_ids + window.target_ids])
    with torch.inference_mode():
        logits = hf_model(input_ids=ids).logits[0, -len(window.target_ids) - 1 : -1]
    return logits.float().log_softmax(-1).gather(-1, ids[0, -len(window.target_ids) :, None])[:, 0]


def plain_loop(model, method, windows, retrieved):
    """DRAGON's way: one plain forward pass per window and prefix, then for `ensemble`
    REPLUG's mixture over the passages."""
    mixed = []
    for window, docs in zip(windows, retrieved):
        per_pass = [plain_logprobs(model.hf_model, prefix, window) for prefix in prefixes(model, method, window, docs)]
        mixed.append(mixture_logprobs(torch.stack(per_pass), torch.tensor([r.score for r in docs]))
                     if method == "ensemble" else per_pass[0])
    return mixed


def plain_generation(model, prompts, max_new_tokens):
    """One plain `generate` per prompt, to the token limit."""
    texts = []
    for prompt in prompts:
        inputs = model.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            output = model.hf_model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                             pad_token_id=model.tokenizer.pad_token_id)
        texts.append(model.decode(output[0, inputs["input_ids"].shape[1] :].tolist()))
    return texts


def lm_eval_rolling(model, text, max_length):
    """lm-eval's `loglikelihood_rolling` of `text` with its HFLM wrapped around our model."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model.hf_model, tokenizer=model.tokenizer, batch_size=1, max_length=max_length)
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    return lm.loglikelihood_rolling([request], disable_tqdm=True)


def print_timed(workload, runs, tokens, flops, compare) -> None:
    """Time each (implementation, dtype, function) of `runs` in turn and print its table row:
    seconds, tokens/s, speed-up over the first run, MFU against the matmul rate of its dtype
    measured just before it (the machine is shared: its speed drifts), and what
    `compare(implementation, result, first result)` says."""
    first = None
    for label, dtype, run in runs:
        rate = matmul_rate(getattr(torch, dtype))
        start = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - start
        first = first or (seconds, result)
        mfu = f"{flops / seconds / rate:.0%}" if flops else "–"
        print(f"| {workload} | {label} | {dtype} | {seconds:.1f} | {tokens / seconds:.0f} | "
              f"{first[0] / seconds:.2f} | {mfu} | {compare(label, result, first[1])} |", flush=True)


def logprob_difference(label, result, reference) -> str:
    """Δ nats/token of `result` against `reference` and the largest Δ ln p of one token."""
    if label.startswith("lm-eval"):
        return "–"
    ours, theirs = torch.cat(result), torch.cat(reference)
    return f"{float(theirs.sum() - ours.sum()) / len(ours):+.5f} ({float((ours - theirs).abs().max()):.1e})"


def same_answers(label, answers, reference) -> str:
    return f"same answer: {sum(a == b for a, b in zip(answers, reference))}/{len(answers)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=2, help="WikiText-2 windows (after the first)")
    parser.add_argument("--k", type=int, default=4, help="passages per window (incontext, ensemble)")
    parser.add_argument("--questions", type=int, default=8, help="SQuAD questions (3 bm25 passages for incontext)")
    parser.add_argument("--with-lm-eval", metavar="SITE", help="folder with lm-eval installed")
    args = parser.parse_args()
    if args.with_lm_eval:
        sys.path.insert(0, args.with_lm_eval)

    print(f"machine: {machine()}")
    print(f"matmul [4096x576]@[576x1536]: float32 {matmul_rate(torch.float32) / 1e9:.0f} GFLOP/s, "
          f"bfloat16 {matmul_rate(torch.bfloat16) / 1e9:.0f} GFLOP/s (MFU: against the rate just before each row)")
    models = {"float32": load_model(None, dtype="float32"), "auto": load_model(None, dtype="auto")}
    old = At83a5fc6(models["float32"].hf_model, models["float32"].tokenizer, "83a5fc6", batch_size=8)
    for model in (old, *models.values()):  # first calls set up kernels: not part of the timings
        model.sequence_logprobs([list(range(1, 65))], [1])
        model.generate(["The"], 2)
    cache = Cache(cache_root())
    data_dir = os.environ.get("RAGHUB_DATA_DIR")

    task = LanguageModelling("wikitext2", read_task_definition(TASKS / "wikitext2.yaml"), data_dir,
                             datastore="heldout-articles")
    windows = task.examples(old, args.windows + 1)[1:]  # the first window retrieves nothing
    passages, _ = task.corpus()
    # which passages does not change the cost: the first k from other articles, best first
    retrieved = [[Retrieved(p, float(args.k - rank)) for rank, p in
                  enumerate([p for p in passages if p.group != w.exclude_group][: args.k])] for w in windows]
    scored = sum(len(w.target_ids) for w in windows)
    print(f"WikiText-2: {len(windows)} windows, {scored} scored tokens, K = {args.k}; SQuAD: {args.questions} "
          f"questions (tokens/s: prompt tokens); token budget {models['auto'].token_budget}\n")
    print("| workload | implementation | dtype | s | tokens/s | × 83a5fc6 | MFU | against 83a5fc6 |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for name, method_class in METHODS.items():
        docs = retrieved if name != "none" else [[] for _ in windows]
        lengths = [len(prefix) + len(w.context_ids) + len(w.target_ids) for w, docs_of in zip(windows, docs)
                   for prefix in prefixes(old, name, w, docs_of)]
        runs = [("raghub 83a5fc6", "float32", lambda: method_class(old, cache).score_windows(windows, docs))]
        for model in models.values():
            runs.append(("raghub", model.dtype, lambda model=model: method_class(model, cache).score_windows(windows, docs)))
            runs.append(("plain loop", model.dtype, lambda model=model: plain_loop(model, name, windows, docs)))
        if args.with_lm_eval and name == "none":
            text = old.decode(windows[0].context_ids + [t for w in windows for t in w.target_ids])
            for model in models.values():
                runs.append(("lm-eval rolling", model.dtype, lambda model=model: lm_eval_rolling(
                    model, text, len(windows[0].context_ids) + len(windows[0].target_ids))))
        # every pass scores its window's targets: K passes per window for the ensemble
        flops = scoring_flops(old, lengths, scored * len(lengths) // len(windows))
        print_timed(name, runs, scored, flops, logprob_difference)

    qa = QATask("squad", read_task_definition(TASKS / "squad.yaml"), data_dir, registry=registry())
    questions = qa.examples(old, args.questions)
    hits, _, _ = retrieve(qa, BM25S(cache), questions, 3, cache)
    for name, method_class in (("none", ClosedBook), ("incontext", InContext)):
        prompts = [q.prompt([r.passage for r in docs] if name == "incontext" else [])
                   for q, docs in zip(questions, hits)]
        runs = [("raghub 83a5fc6", "float32", lambda: method_class(old, cache).answer(questions, hits))]
        for model in models.values():
            runs.append(("raghub", model.dtype, lambda model=model: method_class(model, cache).answer(questions, hits)))
            runs.append(("raghub, no prefix cache", model.dtype, lambda model=model: without_prefix_cache(
                lambda: method_class(model, cache).answer(questions, hits))))
            runs.append(("plain loop", model.dtype, lambda model=model: [
                q.extract(text) for q, text in zip(questions, plain_generation(model, prompts, questions[0].max_new_tokens))]))
        print_timed(f"squad QA {name}", runs, sum(len(old.encode(p)) for p in prompts), None, same_answers)


if __name__ == "__main__":
    main()
