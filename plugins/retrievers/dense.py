"""`dense`: a sentence-transformers encoder and a FAISS index (flat inner product by default).

Passage embeddings and the FAISS index are two cache entries (`raghub.kits.vector_index`): changing
the index type reuses the embeddings; a new encoder or similarity re-embeds.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Sequence

import numpy as np

from raghub import Option, PASSAGE_ENCODER, Passage, QUERY_ENCODER, hookimpl
from raghub.kits.embedded import DEFAULT_ENCODER_NAME, sentence_encoder
from raghub.kits.trainable import TrainableEncoders, sentence_embeddings
from raghub.kits.vector_index import EmbeddingRetriever

SIMILARITIES = ("cosine", "inner-product")


class DenseRetriever(EmbeddingRetriever):
    name = "dense"
    description = "sentence-transformers encoder + FAISS (any index_factory string; flat, IVF or HNSW)"
    options = {
        "encoder": Option(
            str, DEFAULT_ENCODER_NAME,
            "sentence-transformers model: hub id (e.g. facebook/contriever) or folder; the default "
            "is the embedded all-MiniLM-L6-v2",
        ),
        "similarity": Option(
            SIMILARITIES, "cosine",
            "cosine (unit-normalised embeddings, MiniLM's objective) or raw inner-product "
            "(Contriever, DRAGON)",
        ),
        **EmbeddingRetriever.options,
    }

    def _load(self, spec: str):
        """A sentence-transformers model (on CUDA when available)."""
        return sentence_encoder(spec, "dense")

    @cached_property
    def encoder(self):
        """The passages' encoder: `--encoder`, or the checkpoint's trained passage encoder."""
        return self._load(self.trained_or_given(PASSAGE_ENCODER, "encoder"))

    @cached_property
    def query_encoder(self):
        """The queries' encoder: the checkpoint's trained one, else the passages'."""
        return self._load(str(self.checkpoint.part(QUERY_ENCODER))) if self.checkpoint else self.encoder

    def embed(self, texts: Sequence[str], encoder: Any = None) -> np.ndarray:
        """float32 embeddings [len(texts), dim] by `encoder` (default: the passages'),
        unit-normalised for cosine similarity."""
        return (encoder or self.encoder).encode(
            list(texts), batch_size=self.settings["encode_batch_size"], convert_to_numpy=True,
            normalize_embeddings=self.settings["similarity"] == "cosine", show_progress_bar=False,
        ).astype(np.float32)

    def embed_passages(self, passages: Sequence[Passage]) -> np.ndarray:
        return self.embed([p.as_text() for p in passages])

    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        return self.embed(queries, self.query_encoder)

    def embedding_key(self) -> dict[str, Any]:
        return {**self.passage_encoder_identity("encoder"), "similarity": self.settings["similarity"]}

    def trainable_encoders(self, train_passages: bool) -> TrainableEncoders:
        """The query encoder, and with `train_passages` a passage encoder trained apart from it."""
        import copy

        passage = None
        if train_passages:
            passage = self.encoder if self.encoder is not self.query_encoder else copy.deepcopy(self.encoder)
        return SentenceTransformerEncoders(self.query_encoder, passage, self.settings["similarity"] == "cosine")


class SentenceTransformerEncoders(TrainableEncoders):
    """`dense`'s encoders in training: unit-normalised embeddings for cosine similarity."""

    def __init__(self, query_module: Any, passage_module: Any | None, normalise: bool):
        super().__init__(query_module, passage_module)
        self.normalise = normalise

    def _embed(self, model: Any, texts: Sequence[str]):
        import torch

        embeddings = sentence_embeddings(model, texts)
        return torch.nn.functional.normalize(embeddings, dim=-1) if self.normalise else embeddings

    def embed_queries(self, queries: Sequence[str]):
        return self._embed(self.query_module, queries)

    def embed_passages(self, passages: Sequence[Passage]):
        return self._embed(self.passage_module, [p.as_text() for p in passages])

    def save_module(self, module: Any, folder) -> None:
        module.save(str(folder))


@hookimpl
def register_retrievers(register):
    register(DenseRetriever)
