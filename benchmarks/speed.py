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

With `--model-shape opt-1.3b` (meant for a GPU) the model is instead one with random weights in
OPT-1.3B's shape, in the device's native dtype, and the table holds raghub's `none` and
`ensemble` scoring against the plain loop; `--peak-tflops` takes MFU against the accelerator's
datasheet peak instead of the measured matmul rate (`opt-tiny` runs the same path in seconds):

    python benchmarks/speed.py --model-shape opt-1.3b --windows 8 --k 4 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from raghub import Retrieved, allocator, mixture_logprobs, passage_ids
from raghub.models import load_model
from raghub.cache import Cache, cache_root
from raghub.models import Generation
from raghub.plugin_manager import default_host
from raghub.plugins.methods.ensemble import Ensemble
from raghub.plugins.methods.incontext import InContext
from raghub.plugins.methods.none import ClosedBook
from raghub.plugins.models import huggingface
from raghub.plugins.models.huggingface import TransformersLM
from raghub.kits.pretrained import BF16_CPU_FLAGS, cpu_flags, native_dtype
from raghub.plugins.retrievers.bm25 import BM25S
from raghub.plugins.tasks.language_modelling import LanguageModelling
from raghub.plugins.tasks.question_answering.task import QATask
from raghub.retrieval import retrieve
from raghub.settings import read_task_definition

TASKS = Path(__file__).resolve().parents[1] / "tasks"
METHODS = {"none": ClosedBook, "incontext": InContext, "ensemble": Ensemble}
# random-weight OPT configurations: OPT-1.3B's published sizes, and a tiny one to check the path
SHAPES = {"opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192),
          "opt-tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128)}


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


def synchronize(device) -> None:
    """Wait for the device's queued work (a GPU runs asynchronously), so a clock read is true."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(dtype: torch.dtype, rows: int = 4096, inner: int = 576, columns: int = 1536,
                device: str = "cpu") -> float:
    """FLOP/s of a timed [rows, inner] @ [inner, columns] product (the model's MLP shape)."""
    a = torch.randn(rows, inner, dtype=dtype, device=device)
    b = torch.randn(inner, columns, dtype=dtype, device=device)
    torch.matmul(a, b)
    synchronize(device)
    repeats, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.5:
        torch.matmul(a, b)
        repeats += 1
        synchronize(device)
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
    ids = torch.tensor([prefix + window.context_ids + window.target_ids], device=hf_model.device)
    with torch.inference_mode():
        logits = hf_model(input_ids=ids).logits[0, -len(window.target_ids) - 1 : -1]
    return logits.float().log_softmax(-1).gather(-1, ids[0, -len(window.target_ids) :, None])[:, 0].cpu()


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


class Table(NamedTuple):
    """One workload's rows: (implementation, dtype, function, whether raghub's CLI runs it) each;
    `tokens` counted per second; `flops` useful FLOPs (None: no MFU); `compare(implementation,
    result, first result)` says how a row's result differs from the first row's."""

    workload: str
    runs: list[tuple[str, str, Callable[[], Any], bool]]
    tokens: int
    flops: float | None
    compare: Callable[[str, Any, Any], str]


def print_tables(tables: list[Table], rate_of=matmul_rate, device="cpu") -> None:
    """Time every run, then print each table's rows: seconds, tokens/s, speed-up over its first
    row, MFU against `rate_of(dtype)` (by default the matmul rate measured just before the row:
    the machine is shared, its speed drifts) and the comparison. The runs that other tools (and
    raghub 83a5fc6) make go first, with glibc's default allocator as those tools run; then
    raghub's own, after `allocator.keep_freed_memory()` as its CLI runs them (a process cannot
    undo it)."""
    timed = {}
    for kept in (False, True):
        if kept:
            allocator.keep_freed_memory()
        for t, table in enumerate(tables):
            for r, (label, dtype, run, by_raghub) in enumerate(table.runs):
                if by_raghub == kept:
                    rate = rate_of(getattr(torch, dtype))
                    start = time.perf_counter()
                    result = run()
                    synchronize(device)
                    timed[t, r] = (time.perf_counter() - start, result, rate)
                    print(f"timed {table.workload}: {label}, {dtype}", file=sys.stderr, flush=True)
    for t, table in enumerate(tables):
        first_seconds, first_result, _ = timed[t, 0]
        for r, (label, dtype, _, _) in enumerate(table.runs):
            seconds, result, rate = timed[t, r]
            mfu = f"{table.flops / seconds / rate:.0%}" if table.flops else "–"
            print(f"| {table.workload} | {label} | {dtype} | {seconds:.1f} | {table.tokens / seconds:.0f} | "
                  f"{first_seconds / seconds:.2f} | {mfu} | {table.compare(label, result, first_result)} |", flush=True)


def logprob_difference(label, result, reference) -> str:
    """Δ nats/token of `result` against `reference` and the largest Δ ln p of one token."""
    if label.startswith("lm-eval"):
        return "–"
    ours, theirs = torch.cat(result), torch.cat(reference)
    return f"{float(theirs.sum() - ours.sum()) / len(ours):+.5f} ({float((ours - theirs).abs().max()):.1e})"


def same_answers(label, answers, reference) -> str:
    return f"same answer: {sum(a == b for a, b in zip(answers, reference))}/{len(answers)}"


def wikitext_windows(model, count: int, k: int, data_dir):
    """`count` WikiText-2 test windows after the first (which retrieves nothing), each with
    the first `k` passages of other articles, best first: which passages does not change the
    cost."""
    task = LanguageModelling("wikitext2", read_task_definition(TASKS / "wikitext2.yaml"), data_dir,
                             datastore="heldout-articles")
    windows = task.examples(model, count + 1)[1:]
    passages, _ = task.corpus()
    retrieved = [[Retrieved(p, float(k - rank)) for rank, p in
                  enumerate([p for p in passages if p.group != w.exclude_group][:k])] for w in windows]
    return windows, retrieved


def scoring_workload(model, name, windows, retrieved):
    """(documents per window, useful FLOPs) of method `name` scoring `windows` with `model`."""
    docs = retrieved if name != "none" else [[] for _ in windows]
    lengths = [len(prefix) + len(w.context_ids) + len(w.target_ids) for w, docs_of in zip(windows, docs)
               for prefix in prefixes(model, name, w, docs_of)]
    scored = sum(len(w.target_ids) for w in windows)
    # every pass scores its window's targets: K passes per window for the ensemble
    return docs, scoring_flops(model, lengths, scored * len(lengths) // len(windows))


def random_opt(shape: str, tokenizer, device: str) -> TransformersLM:
    """A random-weight OPT of `SHAPES[shape]` in the device's native dtype, with the embedded
    model's tokenizer (and so its vocabulary)."""
    from transformers import OPTConfig, OPTForCausalLM

    sizes = SHAPES[shape]
    config = OPTConfig(**sizes, word_embed_proj_dim=sizes["hidden_size"], vocab_size=len(tokenizer),
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    dtype = getattr(torch, native_dtype(torch.device(device)))
    hf_model = OPTForCausalLM(config).to(device=device, dtype=dtype).eval()
    return TransformersLM(hf_model, tokenizer, f"random {shape}", batch_size=8)


def shaped_benchmark(args, data_dir) -> None:
    """raghub's `none` and `ensemble` scoring against the plain loop with a random `--model-shape`."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(huggingface.GGUF().location(None)[1])  # the embedded model's
    model = random_opt(args.model_shape, tokenizer, device)
    sizes = SHAPES[args.model_shape]
    rate_of = ((lambda dtype: args.peak_tflops * 1e12) if args.peak_tflops else
               (lambda dtype: matmul_rate(dtype, 4096, sizes["hidden_size"], sizes["ffn_dim"], device)))
    print(f"machine: {machine()}; device {device}"
          + (f", {torch.cuda.get_device_name(device)}" if device.startswith("cuda") else ""))
    print(f"model: random weights, {args.model_shape} ({sizes}), {model.dtype}; MFU against "
          + (f"the datasheet peak, {args.peak_tflops:g} TFLOP/s" if args.peak_tflops else
             f"the measured [4096x{sizes['hidden_size']}]@[{sizes['hidden_size']}x{sizes['ffn_dim']}] matmul rate"))
    windows, retrieved = wikitext_windows(model, args.windows, args.k, data_dir)
    model.sequence_logprobs([list(range(1, 65))], [1])  # first calls set up kernels
    scored = sum(len(w.target_ids) for w in windows)
    print(f"WikiText-2: {len(windows)} windows, {scored} scored tokens, "
          f"K = {args.k}; token budget {model.token_budget}\n")
    print("| workload | implementation | dtype | s | tokens/s | × raghub | MFU | against raghub |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    cache = Cache(cache_root())
    tables = []
    for name in ("none", "ensemble"):
        docs, flops = scoring_workload(model, name, windows, retrieved)
        runs = [("raghub", model.dtype, lambda name=name, docs=docs: METHODS[name](model, cache).score_windows(windows, docs), True),
                ("plain loop", model.dtype, lambda name=name, docs=docs: plain_loop(model, name, windows, docs), False)]
        tables.append(Table(name, runs, scored, flops, logprob_difference))
    print_tables(tables, rate_of, device)


def embedded_benchmark(args, data_dir) -> None:
    """The embedded model against raghub 83a5fc6, the plain loop and lm-eval, and QA generation."""
    print(f"machine: {machine()}")
    print(f"matmul [4096x576]@[576x1536]: float32 {matmul_rate(torch.float32) / 1e9:.0f} GFLOP/s, "
          f"bfloat16 {matmul_rate(torch.bfloat16) / 1e9:.0f} GFLOP/s (MFU: against the rate just before each row)")
    models = {"float32": load_model(None, dtype="float32"), "auto": load_model(None, dtype="auto")}
    # what DRAGON's loop and lm-eval get from transformers: its default attention, SDPA
    plain = {key: load_model(None, dtype=key, model_args="attn_implementation=sdpa") for key in models}
    old = At83a5fc6(models["float32"].hf_model, models["float32"].tokenizer, "83a5fc6", batch_size=8)
    for model in (old, *models.values(), *plain.values()):  # first calls set up kernels: not timed
        model.sequence_logprobs([list(range(1, 65))], [1])
        model.generate(["The"], 2)
    cache = Cache(cache_root())

    windows, retrieved = wikitext_windows(old, args.windows, args.k, data_dir)
    scored = sum(len(w.target_ids) for w in windows)
    print(f"WikiText-2: {len(windows)} windows, {scored} scored tokens, K = {args.k}; SQuAD: {args.questions} "
          f"questions (tokens/s: prompt tokens); token budget {models['auto'].token_budget}\n")
    print("| workload | implementation | dtype | s | tokens/s | × 83a5fc6 | MFU | against 83a5fc6 |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    tables = []
    for name, method_class in METHODS.items():
        docs, flops = scoring_workload(old, name, windows, retrieved)
        score = lambda model, method_class=method_class, docs=docs: method_class(model, cache).score_windows(windows, docs)
        runs = [("raghub 83a5fc6", "float32", lambda score=score: score(old), False)]
        for model, baseline in zip(models.values(), plain.values()):
            runs.append(("raghub", model.dtype, lambda score=score, model=model: score(model), True))
            runs.append(("plain loop", model.dtype, lambda model=baseline, name=name, docs=docs: plain_loop(
                model, name, windows, docs), False))
        runs.append(("raghub, glibc's default allocator", models["auto"].dtype, lambda score=score: score(models["auto"]), False))
        if args.with_lm_eval and name == "none":
            text = old.decode(windows[0].context_ids + [t for w in windows for t in w.target_ids])
            for model in plain.values():
                runs.append(("lm-eval rolling", model.dtype, lambda model=model: lm_eval_rolling(
                    model, text, len(windows[0].context_ids) + len(windows[0].target_ids)), False))
        tables.append(Table(name, runs, scored, flops, logprob_difference))

    qa = QATask("squad", read_task_definition(TASKS / "squad.yaml"), data_dir, registry=default_host().registry)
    questions = qa.examples(old, args.questions)
    hits, _, _ = retrieve(qa, BM25S(cache), questions, 3, cache)
    for name, method_class in (("none", ClosedBook), ("incontext", InContext)):
        prompts = [q.prompt([r.passage for r in docs] if name == "incontext" else [])
                   for q, docs in zip(questions, hits)]
        answer = lambda model, method_class=method_class: method_class(model, cache).answer(questions, hits)
        runs = [("raghub 83a5fc6", "float32", lambda answer=answer: answer(old), False)]
        for model, baseline in zip(models.values(), plain.values()):
            runs.append(("raghub", model.dtype, lambda answer=answer, model=model: answer(model), True))
            runs.append(("raghub, no prefix cache", model.dtype, lambda answer=answer, model=model: without_prefix_cache(
                lambda: answer(model)), True))
            runs.append(("plain loop", model.dtype, lambda model=baseline, prompts=prompts: [
                q.extract(text) for q, text in zip(questions, plain_generation(model, prompts, questions[0].max_new_tokens))],
                False))
        tables.append(Table(f"squad QA {name}", runs, sum(len(old.encode(p)) for p in prompts), None, same_answers))
    print_tables(tables)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=2, help="WikiText-2 windows (after the first)")
    parser.add_argument("--k", type=int, default=4, help="passages per window (incontext, ensemble)")
    parser.add_argument("--questions", type=int, default=8, help="SQuAD questions (3 bm25 passages for incontext)")
    parser.add_argument("--with-lm-eval", metavar="SITE", help="folder with lm-eval installed")
    parser.add_argument("--model-shape", choices=sorted(SHAPES),
                        help="random weights in this shape instead of the embedded model (scoring only)")
    parser.add_argument("--device", help="with --model-shape: torch device (default: cuda if available, else cpu)")
    parser.add_argument("--peak-tflops", type=float,
                        help="with --model-shape: the accelerator's datasheet peak in its native dtype, for MFU")
    args = parser.parse_args(argv)
    if args.with_lm_eval:
        sys.path.insert(0, args.with_lm_eval)
    data_dir = os.environ.get("RAGHUB_DATA_DIR")
    if args.model_shape:
        shaped_benchmark(args, data_dir)
    else:
        embedded_benchmark(args, data_dir)


if __name__ == "__main__":
    main()
