"""A complete third-party raghub plugin: the `uniform` method, a baseline that gives every
token of the vocabulary the same probability (a language model that knows nothing)."""

import math

import torch

from raghub import Method, hookimpl


class Uniform(Method):
    name = "uniform"
    description = "every token equally likely: ln p = -ln |vocabulary|"
    needs_retrieval = False

    def score_windows(self, windows, retrieved):
        log_p = -math.log(len(self.model.tokenizer))
        return [torch.full((len(w.target_ids),), log_p) for w in windows]


@hookimpl
def register_methods(register):
    register(Uniform)
