"""Parametric RAG adapter training: the sequential peft loop against batched training.

Trains one LoRA per passage for N SQuAD dev paragraphs on the embedded model, first one passage
at a time (peft, the reference loop), then all at once in groups of `--parallel` (one batched
forward with a low-rank delta per row), and reports the wall times, their ratio and the largest
relative difference between the two sets of adapters' weight deltas. The augmentation is a fixed stand-in (the timing
only depends on the token counts), so the benchmark measures training alone.

    RAGHUB_CACHE=/tmp/rhcache RAGHUB_DATA_DIR=/work/shared/data \
        python benchmarks/parametric_training.py --passages 8 --parallel 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from raghub.cache import Cache
from raghub import PromptTemplate, Question
from raghub.models import load_model
from raghub.plugins.methods.parametric.augmentation import Augmentation, QAPair, training_texts
from raghub.plugins.methods.parametric.method import Parametric
from raghub.plugins.tasks.question_answering.formats import read_questions, read_rows

SQUAD_FILE = "squad/dev-v1.1.rebuilt-from-explorer-html.json"


def stand_in_augmentation(text: str) -> Augmentation:
    """A rewrite (sentences reversed) and three QA pairs of realistic length."""
    sentences = [s.strip() for s in text.split(". ") if s.strip()]
    pairs = tuple(QAPair(f"What does the passage say in sentence {n}?", sentence[:60], sentence)
                  for n, sentence in enumerate((sentences * 3)[:3], 1))
    return Augmentation(". ".join(reversed(sentences)), pairs)


def relative_delta_difference(adapter: dict, reference: dict) -> float:
    """The largest ||ΔW - ΔW_ref|| / ||ΔW_ref|| over the adapted layers, ΔW = B A. (The factors
    themselves can differ by up to ~lr per element: AdamW's first steps move every weight by
    about ±lr whatever the gradient's size, so the sign of a near-zero gradient shows.)"""
    layers = [key.removesuffix(".lora_A.weight") for key in reference if key.endswith(".lora_A.weight")]
    return max(float(torch.linalg.norm(adapter[f"{n}.lora_B.weight"] @ adapter[f"{n}.lora_A.weight"]
                                       - reference[f"{n}.lora_B.weight"] @ reference[f"{n}.lora_A.weight"])
                     / torch.linalg.norm(reference[f"{n}.lora_B.weight"] @ reference[f"{n}.lora_A.weight"]))
               for n in layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=8)
    parser.add_argument("--parallel", type=int, nargs="+", default=[4, 8])
    args = parser.parse_args()

    data_dir = Path(os.environ.get("RAGHUB_DATA_DIR", "../shared/data"))
    squad = read_questions("squad", read_rows(data_dir / SQUAD_FILE), SQUAD_FILE)
    paragraphs = list({p.id: p for p in squad.passages}.values())
    passages = paragraphs[: args.passages]
    model = load_model(None)
    question = Question(id="q", query="", question="", template=PromptTemplate(
        style="completion", few_shot=(("Who wrote the novel Nineteen Eighty-Four?", "George Orwell"),)))
    with tempfile.TemporaryDirectory() as folder:
        augmenter = Parametric(model, Cache(folder))
        examples = [[augmenter._token_ids(*text) for text in training_texts(question, p, stand_in_augmentation(p.text))]
                    for p in passages]
        start = time.perf_counter()
        sequential = augmenter.bank.train_sequential(examples)
        sequential_s = time.perf_counter() - start
        report = {"device": str(model.device), "torch_threads": torch.get_num_threads(),
                  "passages": len(passages), "examples_per_passage": 5,
                  "mean_tokens_per_example": sum(map(len, sum(examples, []))) / (5 * len(passages)),
                  "sequential_s": round(sequential_s, 2), "batched": []}
        for size in args.parallel:
            order = sorted(range(len(examples)), key=lambda i: sum(map(len, examples[i])))
            start = time.perf_counter()
            batched = {}
            for first in range(0, len(order), size):
                chunk = order[first : first + size]
                batched.update(zip(chunk, augmenter.bank.train_batched([examples[i] for i in chunk])))
            batched_s = time.perf_counter() - start
            difference = max(relative_delta_difference(batched[i], sequential[i]) for i in range(len(examples)))
            report["batched"].append({"parallel": size, "seconds": round(batched_s, 2),
                                      "speed-up": round(sequential_s / batched_s, 2),
                                      "max_relative_delta_difference": difference})
        augmenter.close()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
