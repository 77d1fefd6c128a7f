"""Causal self-attention from bfloat16 matrix products over blocks of query rows, for CPUs.

PyTorch's CPU flash-attention kernel runs bfloat16 no faster than float32, while a bfloat16
matrix product runs several times faster on a CPU with AVX-512 BF16 or AMX. This computes the
same exact causal attention as `scaled_dot_product_attention(is_causal=True)`: each block of
`BLOCK_ROWS` queries is multiplied against only the keys at or before its last row, so the
masked upper triangle is skipped except on the block's own diagonal square. Anything else
(a mask, a key/value cache longer than the queries, position biases, non-causal attention) is
left to transformers' SDPA attention unchanged.
"""

from __future__ import annotations

#: the name transformers knows this attention by (`attn_implementation`)
BLOCK_CAUSAL = "raghub_block_causal"
#: query rows per block: small enough that a block's scores stay in the CPU's cache
BLOCK_ROWS = 64


def block_causal_attention(query, key, value, scaling: float):
    """Exact causal attention: `query` [B, H, T, D], `key` and `value` [B, KV, T, D] (H a
    multiple of KV, grouped-query heads) -> [B, T, H, D], the layout transformers expects."""
    import torch

    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    grouped = (query * scaling).view(batch, kv_heads, group, length, dim)
    output = torch.empty(batch, length, kv_heads, group, dim, dtype=query.dtype, device=query.device)
    future = torch.ones(BLOCK_ROWS, BLOCK_ROWS, dtype=torch.bool, device=query.device).triu(1)
    for start in range(0, length, BLOCK_ROWS):
        end = min(length, start + BLOCK_ROWS)
        rows = end - start
        scores = torch.matmul(grouped[:, :, :, start:end].reshape(batch, kv_heads, group * rows, dim),
                              key[:, :, :end].transpose(-1, -2))
        scores.view(batch, kv_heads, group, rows, end)[..., start:end].masked_fill_(future[:rows, :rows], float("-inf"))
        block = torch.matmul(torch.softmax(scores, dim=-1), value[:, :, :end])
        output[:, start:end] = block.view(batch, kv_heads, group, rows, dim).permute(0, 3, 1, 2, 4)
    return output.view(batch, length, heads, dim)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: the block-causal path for unmasked causal
    self-attention over more than one block, transformers' SDPA attention otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    plain = not any(kwargs.get(name) is not None for name in ("position_bias", "cache", "softcap", "sliding_window"))
    if (causal and plain and attention_mask is None and dropout == 0.0 and key.shape[2] == query.shape[2]
            and query.shape[2] > BLOCK_ROWS and query.shape[1] % key.shape[1] == 0):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return block_causal_attention(query, key, value, scale), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def register() -> None:
    """Make `BLOCK_CAUSAL` known to transformers (attention and mask, the mask as for SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(BLOCK_CAUSAL, attention_forward)
    AttentionMaskInterface.register(BLOCK_CAUSAL, sdpa_mask)
