"""train.attention: varlen, attention record by record inside packed rows, with no mask.

For sdpa and eager, transformers turns a packed row's position-id restarts into a block-diagonal
mask, and the kernels that take a mask compute every query of the row against every key of the
row, masked or not: attention costs the square of the row's length, whatever its records' lengths
(docs/training.md, "Choosing pack_tokens"). Here the training loop hands the attention the records'
boundaries instead, as the keyword arguments transformers passes to every attention function
(`cu_seq_lens_q/k`, `max_length_q/k`, which its padding-free flash-attention path uses too), and
each record attends only to itself:

- `kernel`: PyTorch's own variable-length flash attention (`torch.nn.attention.varlen.varlen_attn`,
  PyTorch 2.9 and later; forward and backward) on CUDA in bf16 or fp16. It skips every key outside
  the record, so attention costs the sum of the records' squares. No flash-attn package is needed.
- `per_record`: scaled_dot_product_attention once per record (causal) anywhere else: the same
  arithmetic as sdpa on the masked row without its masked part (what the CPU tests compare).

The function is registered with transformers' AttentionInterface as "varlen" when this module is
imported; `model.set_attn_implementation("varlen")` then routes every layer's attention here.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

NAME = "varlen"
KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def packed_boundaries(position_ids: torch.Tensor) -> dict:
    """The attention keyword arguments of one packed row whose position ids restart at 0 for every
    record: cumulative record lengths (int32) and the longest record, for queries and keys alike
    (training has no cache: each record's queries are its keys)."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 1:
        raise ValueError(f"attention {NAME}: expected one packed row of position ids, got shape "
                         f"{tuple(position_ids.shape)}")
    flat = position_ids[0]
    starts = torch.nonzero(flat == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError(f"attention {NAME}: a packed row must start a record at position 0")
    cumulative = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    longest = int((cumulative[1:] - cumulative[:-1]).max())
    return {"cu_seq_lens_q": cumulative, "cu_seq_lens_k": cumulative, "max_length_q": longest,
            "max_length_k": longest}


@functools.cache
def kernel_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel_keywords(function) -> frozenset:
    """The keyword parameters of this release's varlen_attn (read once per function, not per layer)."""
    return frozenset(inspect.signature(function).parameters)


def implementation(device: torch.device, dtype: torch.dtype) -> str:
    """kernel on CUDA in half precision where PyTorch has it, else per_record."""
    if device.type == "cuda" and dtype in KERNEL_DTYPES and kernel_available():
        return "kernel"
    return "per_record"


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, cu_seq_lens_q=None, cu_seq_lens_k=None,
                             max_length_q=None, max_length_k=None, **kwargs):
    """transformers' attention-function interface: query [1, heads, T, dim], key and value
    [1, kv_heads, T, dim] of one packed row; returns ([1, T, heads, dim], None)."""
    if cu_seq_lens_q is None or cu_seq_lens_k is None:
        raise ValueError(f"attention {NAME} attends within packed records and needs their boundaries "
                         "(cu_seq_lens_q/k): it serves packed training rows only (train.packing: true)")
    if query.shape[0] != 1:
        raise ValueError(f"attention {NAME}: one packed row per forward, got a batch of {query.shape[0]}")
    if dropout:
        raise ValueError(f"attention {NAME}: attention dropout is not supported (got {dropout})")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, dim]
    if implementation(q.device, q.dtype) == "kernel":
        out = _kernel(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scaling)
    else:
        out = _per_record(q, k, v, cu_seq_lens_q, cu_seq_lens_k, scaling)
    return out.unsqueeze(0), None


def _kernel(q, k, v, cu_q, cu_k, max_q, max_k, scaling):
    """torch.nn.attention.varlen.varlen_attn, causal within each record. Its keywords moved between
    releases (is_causal, then window_size=(-1, 0); enable_gqa later), so they are taken from its
    signature; without enable_gqa, key and value are repeated to the query's heads."""
    from torch.nn.attention.varlen import varlen_attn

    accepted = _kernel_keywords(varlen_attn)
    options = {"window_size": (-1, 0)} if "window_size" in accepted else {"is_causal": True}
    if scaling is not None and "scale" in accepted:
        options["scale"] = scaling
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        if "enable_gqa" in accepted:
            options["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if max_q is None or max_k is None:  # a host sync; the training loop passes them
        max_q = max_k = int((cu_q[1:] - cu_q[:-1]).max())
    # [T, heads, dim] views of [heads, T, dim] tensors (rotary embeddings return that layout): the
    # flash kernels take packed rows of contiguous tokens
    q, k, v = (x.contiguous() for x in (q, k, v))
    return varlen_attn(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k), **options)


def _per_record(q, k, v, cu_q, cu_k, scaling):
    """scaled_dot_product_attention per record: causal, grouped-query heads shared as in sdpa."""
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    if bounds_q != bounds_k:
        raise ValueError(f"attention {NAME}: queries and keys must be the same records in training "
                         f"(cu_seq_lens_q {bounds_q[:4]}... != cu_seq_lens_k {bounds_k[:4]}...)")
    if bounds_q[-1] != q.shape[0]:
        raise ValueError(f"attention {NAME}: the records cover {bounds_q[-1]} of the row's {q.shape[0]} tokens")
    gqa = q.shape[1] != k.shape[1]
    pieces = []
    for start, end in zip(bounds_q[:-1], bounds_q[1:]):
        qi, ki, vi = (x[start:end].transpose(0, 1) for x in (q, k, v))  # [heads, length, dim]
        pieces.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scaling,
                                                     enable_gqa=gqa).transpose(0, 1))
    return torch.cat(pieces, dim=0)


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)


register()
