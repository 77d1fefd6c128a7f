"""`cross-encoder`: a sentence-transformers `CrossEncoder` (`--reranker-model`: a hub id or a
folder) reads each query with each candidate and scores the pair."""

from __future__ import annotations

from functools import cached_property
from typing import Any, Sequence

from raghub import Option, Passage, Reranker, UsageError, hookimpl
from raghub.kits.pretrained import with_folder_contents


class CrossEncoderReranker(Reranker):
    name = "cross-encoder"
    description = "a sentence-transformers CrossEncoder scores each (query, passage) pair"
    options = {
        "reranker_model": Option(str, "cross-encoder/ms-marco-MiniLM-L-6-v2",
                                 "the cross-encoder: hub id or folder"),
    }

    @classmethod
    def identity(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """Its name and model, and the content of a model folder."""
        return super().identity(with_folder_contents(settings, ["reranker_model"]))

    @cached_property
    def cross_encoder(self) -> Any:
        import torch
        from sentence_transformers import CrossEncoder

        spec = self.settings["reranker_model"]
        try:
            return CrossEncoder(spec, device="cuda" if torch.cuda.is_available() else "cpu")
        except (OSError, ValueError) as error:
            raise UsageError(f"cross-encoder: --reranker-model {spec!r} cannot be loaded: not a local model "
                             f"folder, and the hub could not provide it ({str(error).strip().splitlines()[0]})"
                             ) from error

    def score(self, queries: Sequence[str], candidates: Sequence[Sequence[Passage]]) -> list[list[float]]:
        pairs = [(query, passage.as_text()) for query, passages in zip(queries, candidates) for passage in passages]
        scores = iter(self.cross_encoder.predict(pairs, show_progress_bar=False).tolist() if pairs else [])
        return [[float(next(scores)) for _ in passages] for passages in candidates]


@hookimpl
def register_rerankers(register):
    register(CrossEncoderReranker)
