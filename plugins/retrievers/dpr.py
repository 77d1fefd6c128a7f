"""`dpr`: a DPR-style dual encoder (Karpukhin et al., 2020): a question encoder (`--encoder`)
and a separate passage encoder (`--passage-encoder`), ranked by the inner product of their
outputs in a FAISS index, cached like `dense`'s (`raghub.kits.vector_index`).

Each encoder is a DPR checkpoint or a sentence-transformers model, told apart by its config
(`model_type: dpr`). A DPR checkpoint embeds through transformers' `DPRQuestionEncoder` /
`DPRContextEncoder` (the pooled [CLS] vector), with passages as (title, text) pairs as DPR was
trained; a sentence-transformers model uses its own pooling, with passages as "title\\ntext".
`raghub train --retriever dpr` trains the question encoder (and, with `--train-passages`, the
passage encoder); `--checkpoint DIR` loads the trained towers.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Callable, Sequence

import numpy as np

from raghub import Option, PASSAGE_ENCODER, Passage, QUERY_ENCODER, UsageError, hookimpl
from raghub.kits.trainable import TrainableEncoders, sentence_embeddings
from raghub.kits.vector_index import EmbeddingRetriever

DEFAULT_QUESTION_ENCODER = "facebook/dpr-question_encoder-single-nq-base"
DEFAULT_PASSAGE_ENCODER = "facebook/dpr-ctx_encoder-single-nq-base"


class Encoder:
    """One tower of the dual encoder, loaded from `spec` (hub id or folder): a DPR checkpoint,
    loaded as `dpr_class`, or a sentence-transformers model. Calling it embeds a batch and keeps
    gradients unless torch's grad mode is off."""

    def __init__(self, spec: str, dpr_class: str, device: str):
        import transformers

        try:
            self.is_dpr = transformers.AutoConfig.from_pretrained(spec).model_type == "dpr"
            if self.is_dpr:
                self.model = getattr(transformers, dpr_class).from_pretrained(spec).to(device)
                self.tokenizer = transformers.AutoTokenizer.from_pretrained(spec)
            else:
                from sentence_transformers import SentenceTransformer

                self.model = SentenceTransformer(spec, device=device)
        except (OSError, ValueError) as error:
            raise UsageError(
                f"dpr: encoder {spec!r} cannot be loaded: not a local DPR or sentence-transformers "
                f"folder, and the hub could not provide it ({str(error).strip().splitlines()[0]})"
            ) from error
        self.model.eval()

    def __call__(self, texts: Sequence[str], second_segments: Sequence[str] | None = None):
        """Embeddings [N, d] of `texts` (DPR: each followed by its second segment, when given)."""
        if self.is_dpr:
            limit = min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)
            batch = self.tokenizer(list(texts), list(second_segments) if second_segments else None,
                                   padding=True, truncation=True, max_length=limit, return_tensors="pt")
            return self.model(**batch.to(self.model.device)).pooler_output
        return sentence_embeddings(self.model, texts)

    def passages(self, passages: Sequence[Passage]):
        """Passage embeddings [N, d]: DPR as (title, text) pairs, sentence-transformers as text."""
        if self.is_dpr:
            return self([p.title for p in passages], [p.text for p in passages])
        return self([p.as_text() for p in passages])

    def save(self, folder) -> None:
        """This tower as a folder `Encoder` loads again."""
        if self.is_dpr:
            self.model.save_pretrained(str(folder))
            self.tokenizer.save_pretrained(str(folder))
        else:
            self.model.save(str(folder))


class DPRRetriever(EmbeddingRetriever):
    name = "dpr"
    description = "DPR dual encoder: question and passage encoders, inner product over FAISS"
    options = {
        "encoder": Option(str, DEFAULT_QUESTION_ENCODER,
                          "the question encoder, a DPR checkpoint or sentence-transformers "
                          f"model (hub id or folder; default {DEFAULT_QUESTION_ENCODER})"),
        "passage_encoder": Option(str, DEFAULT_PASSAGE_ENCODER,
                                  "the passage encoder, a DPR checkpoint or sentence-transformers "
                                  "model (hub id or folder)"),
        **EmbeddingRetriever.options,
    }

    @cached_property
    def device(self) -> str:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @cached_property
    def question_encoder(self) -> Encoder:
        return Encoder(self.trained_or_given(QUERY_ENCODER, "encoder"), "DPRQuestionEncoder", self.device)

    @cached_property
    def passage_encoder(self) -> Encoder:
        return Encoder(self.trained_or_given(PASSAGE_ENCODER, "passage_encoder"), "DPRContextEncoder", self.device)

    def batched(self, embed: Callable[[Sequence[Any]], Any], items: Sequence[Any]) -> np.ndarray:
        """float32 embeddings of `items`, `encode_batch_size` per call, without gradients."""
        import torch

        size = self.settings["encode_batch_size"]
        with torch.inference_mode():
            parts = [embed(items[first : first + size]).float().cpu().numpy()
                     for first in range(0, len(items), size)]
        return np.concatenate(parts).astype(np.float32)

    def embed_passages(self, passages: Sequence[Passage]) -> np.ndarray:
        return self.batched(self.passage_encoder.passages, passages)

    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        return self.batched(self.question_encoder, queries)

    def embedding_key(self) -> dict[str, Any]:
        return self.passage_encoder_identity("passage_encoder")

    def trainable_encoders(self, train_passages: bool) -> TrainableEncoders:
        return DualEncoders(self.question_encoder, self.passage_encoder if train_passages else None)


class DualEncoders(TrainableEncoders):
    """`dpr`'s towers in training: raw inner products, as DPR was trained."""

    def __init__(self, question: Encoder, passage: Encoder | None):
        super().__init__(question.model, passage.model if passage else None)
        self.question, self.passage = question, passage

    def embed_queries(self, queries: Sequence[str]):
        return self.question(queries)

    def embed_passages(self, passages: Sequence[Passage]):
        return self.passage.passages(passages)

    def save_module(self, module: Any, folder) -> None:
        (self.question if module is self.query_module else self.passage).save(folder)


@hookimpl
def register_retrievers(register):
    register(DPRRetriever)
