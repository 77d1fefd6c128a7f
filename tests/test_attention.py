"""The block-causal CPU attention computes SDPA's causal attention, leaves everything else to
SDPA, and is what a transformers model in bfloat16 on a CPU runs."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from raghub.kits import attention
from raghub.plugins.models.huggingface import HuggingFaceCausal
from test_models import save_tiny_model


def random_qkv(length, heads=6, kv_heads=2, queries=None, seed=0):
    """query [2, heads, queries or length, 8], key and value [2, kv_heads, length, 8]."""
    torch.manual_seed(seed)
    query = torch.randn(2, heads, queries or length, 8)
    return query, torch.randn(2, kv_heads, length, 8), torch.randn(2, kv_heads, length, 8)


@pytest.mark.parametrize("length", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("heads, kv_heads", [(6, 2), (3, 3)])
def test_block_causal_attention_equals_sdpa_causal_attention(length, heads, kv_heads):
    query, key, value = random_qkv(length, heads, kv_heads)
    expected = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
    ours = attention.block_causal_attention(query, key, value, scaling=8**-0.5)
    assert ours.shape == (2, length, heads, 8)
    assert torch.allclose(ours, expected.transpose(1, 2), atol=1e-5)


@pytest.fixture
def block_calls(monkeypatch):
    """The arguments of each call of the block-causal path (which still computes)."""
    calls = []
    real = attention.block_causal_attention
    monkeypatch.setattr(attention, "block_causal_attention", lambda *args: calls.append(args) or real(*args))
    return calls


def test_only_unmasked_causal_self_attention_takes_the_block_path(block_calls):
    module = SimpleNamespace(is_causal=True, num_key_value_groups=3)
    query, key, value = random_qkv(100)
    attention.attention_forward(module, query, key, value, None)
    assert len(block_calls) == 1

    padding = torch.ones(2, 1, 100, 100, dtype=torch.bool).tril()
    cached = random_qkv(100, queries=40)  # 40 new queries over a cache of 100 keys
    short = random_qkv(attention.BLOCK_ROWS)
    for args, kwargs in [((query, key, value, padding), {}), ((*cached, None), {}), ((*short, None), {}),
                         ((query, key, value, None), {"is_causal": False}),
                         ((query, key, value, None), {"position_bias": torch.zeros(1, 6, 100, 100)})]:
        assert attention.attention_forward(module, *args, **kwargs)[0].shape[:2] == (2, args[0].shape[2])
    assert len(block_calls) == 1


def test_a_model_in_bfloat16_on_a_cpu_runs_block_causal_attention_with_sdpas_results(tmp_path, block_calls):
    save_tiny_model(tmp_path, seed=0)
    assert HuggingFaceCausal().load(str(tmp_path), "cpu", "bfloat16", 2).hardware()["attention"] == attention.BLOCK_CAUSAL
    sdpa = HuggingFaceCausal().load(str(tmp_path), "cpu", "float32", 2)
    assert sdpa.hardware()["attention"] == "sdpa"
    chosen = HuggingFaceCausal(attn_implementation=attention.BLOCK_CAUSAL).load(str(tmp_path), "cpu", "float32", 2)
    assert chosen.hardware()["attention"] == attention.BLOCK_CAUSAL
    torch.manual_seed(1)
    sequences = [torch.randint(2, 4, (length,)).tolist() for length in (150, 90, 30)]
    starts = [1, 40, 5]
    for ours, expected in zip(chosen.sequence_logprobs(sequences, starts), sdpa.sequence_logprobs(sequences, starts)):
        assert torch.allclose(ours, expected, atol=1e-5)
    assert block_calls  # the 150- and 90-token sequences went the block way
