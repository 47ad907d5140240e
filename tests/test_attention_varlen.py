"""train.attention: varlen (stages/core/attention.py): packed records attend record by record, with no
mask, and give the loss and LoRA gradients of sdpa's masked rows; the CUDA kernel's call is checked
against a stand-in with each signature PyTorch has shipped."""

from __future__ import annotations

import pytest
import torch

from stages.core import attention
from stages.core.params import validate_params
from stages.core.training import completion_loss_sum, micro_batches, pack

from test_training_core import SHARED, _lora_model, _loss_and_grads, tiny_params


@pytest.fixture
def examples(tokenizer):
    from stages.core.chat import chat_format

    fmt = chat_format(tokenizer)
    return [fmt.encode(*r) for r in SHARED]


def _set_attention(model, name: str) -> None:
    model.get_base_model().set_attn_implementation(name)


def _calls(monkeypatch, name: str) -> list:
    """Records each call of attention.<name> (the path a layer's attention took)."""
    seen, inner = [], getattr(attention, name)

    def spy(*args, **kwargs):
        seen.append(args)
        return inner(*args, **kwargs)

    monkeypatch.setattr(attention, name, spy)
    return seen


def test_packed_boundaries_are_the_records_cumulative_lengths():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]])
    got = attention.packed_boundaries(positions)
    assert got["cu_seq_lens_q"].tolist() == got["cu_seq_lens_k"].tolist() == [0, 3, 5, 10]
    assert got["cu_seq_lens_q"].dtype == torch.int32
    assert (got["max_length_q"], got["max_length_k"]) == (5, 5)
    with pytest.raises(ValueError, match="a packed row must start a record at position 0"):
        attention.packed_boundaries(torch.tensor([[3, 4, 0, 1]]))
    with pytest.raises(ValueError, match=r"expected one packed row of position ids, got shape \(2, 2\)"):
        attention.packed_boundaries(torch.tensor([[0, 1], [0, 1]]))


def test_varlen_gives_the_per_record_loss_and_lora_gradients_of_sdpas_masked_rows(examples, monkeypatch):
    model = _lora_model()  # 2 heads over 1 KV head: grouped-query attention
    rows = micro_batches(examples, 16, packing=True, pack_tokens=4096)
    assert len(rows) == 1 and rows[0].attention_mask is None  # one packed row of six records
    masked = _loss_and_grads(model, rows)
    alone = _loss_and_grads(model, [pack([e]) for e in examples])

    _set_attention(model, attention.NAME)
    per_record = _calls(monkeypatch, "_per_record")
    varlen = _loss_and_grads(model, rows)
    assert len(per_record) == 2  # each of the 2 layers attended record by record (CPU: no kernel)
    assert varlen[1] == masked[1] == alone[1]
    assert varlen[0] == pytest.approx(masked[0], rel=1e-5) and varlen[0] == pytest.approx(alone[0], rel=1e-5)
    for name, grad in masked[2].items():
        torch.testing.assert_close(varlen[2][name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)


def test_a_record_boundary_moved_by_one_token_changes_the_loss(examples, monkeypatch):
    """The equality above depends on the boundaries: hand the attention wrong ones and the loss moves."""
    model = _lora_model()
    _set_attention(model, attention.NAME)
    row = pack(examples[:2])
    honest = float(completion_loss_sum(model, row)[0])
    real = attention.packed_boundaries

    def shifted(position_ids):
        got = real(position_ids)
        cu = got["cu_seq_lens_q"].clone()
        cu[1] += 1  # the first record also sees the second's first token
        return {**got, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": got["max_length_q"] + 1,
                "max_length_k": got["max_length_k"] + 1}

    monkeypatch.setattr(attention, "packed_boundaries", shifted)
    leaky = float(completion_loss_sum(model, row)[0])
    assert abs(leaky - honest) > 1e-3 * abs(honest)


def _stand_in(signature: str, seen: list):
    """A varlen_attn with one of the signatures PyTorch shipped (2.9-2.11: is_causal; later: window_size,
    scale, enable_gqa) that records its call and answers with the per-record reference."""
    def answer(q, k, v, cu_q, cu_k, max_q, max_k, **options):
        seen.append({"q": tuple(q.shape), "k": tuple(k.shape), "cu": cu_q.tolist(), "dtype": cu_q.dtype,
                     "max": (max_q, max_k), "contiguous": all(x.is_contiguous() for x in (q, k, v)), **options})
        return attention._per_record(q, k, v, cu_q, cu_k, options.get("scale"))

    if signature == "is_causal":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None):
            return answer(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=is_causal)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False):
            return answer(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                          window_size=window_size, enable_gqa=enable_gqa)
    return varlen_attn


@pytest.mark.parametrize("signature", ["is_causal", "window_size"])
def test_the_kernel_path_hands_pytorch_each_record_causally_in_its_signatures_terms(examples, monkeypatch, signature):
    import torch.nn.attention.varlen as varlen_module

    model = _lora_model()
    row = pack(examples)
    with torch.no_grad():
        masked = float(completion_loss_sum(model, row)[0])
    seen = []
    monkeypatch.setattr(varlen_module, "varlen_attn", _stand_in(signature, seen))
    monkeypatch.setattr(attention, "implementation", lambda device, dtype: "kernel")  # as on CUDA in bf16
    _set_attention(model, attention.NAME)
    with torch.no_grad():
        via_kernel = float(completion_loss_sum(model, row)[0])
    assert via_kernel == pytest.approx(masked, rel=1e-5)
    lengths = [len(e.input_ids) for e in examples]
    cumulative = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert len(seen) == 2  # one call a layer
    for call in seen:
        assert (call["cu"], call["dtype"], call["max"]) == (cumulative, torch.int32, (max(lengths), max(lengths)))
        assert call["q"] == (sum(lengths), 2, 16) and call["contiguous"]
        if signature == "is_causal":  # no enable_gqa: key and value repeated to the query's 2 heads
            assert call["is_causal"] is True and call["k"] == (sum(lengths), 2, 16)
        else:
            assert call["window_size"] == (-1, 0) and call["enable_gqa"] is True and call["k"] == (sum(lengths), 1, 16)
            assert call["scale"] == pytest.approx(16 ** -0.5)


def test_varlen_is_chosen_on_cuda_in_half_precision_only():
    cpu = torch.device("cpu")
    assert attention.implementation(cpu, torch.float32) == "per_record"
    assert attention.implementation(cpu, torch.bfloat16) == "per_record"  # no CUDA: no flash kernel
    assert attention.kernel_available()  # torch.nn.attention.varlen is in the pinned torch
    cuda = torch.device("cuda")  # a device name only: nothing runs on it
    assert attention.implementation(cuda, torch.bfloat16) == attention.implementation(cuda, torch.float16) == "kernel"
    assert attention.implementation(cuda, torch.float32) == "per_record"


def test_varlen_needs_packing_and_the_transformers_backend_and_says_so():
    with pytest.raises(Exception, match="attention: varlen attends within packed records and needs packing: true"):
        validate_params({"train": {"attention": "varlen", "packing": False}})
    with pytest.raises(Exception, match="attention: varlen is the transformers backend's"):
        validate_params({"train": {"attention": "varlen", "backend": "unsloth"}})
    assert tiny_params(attention="varlen").train.attention == "varlen"
    q = torch.zeros(1, 2, 5, 8)
    with pytest.raises(ValueError, match="needs their boundaries .cu_seq_lens_q/k.: it serves packed training rows"):
        attention.varlen_attention_forward(None, q, q, q, None)


def test_varlen_turns_shared_prefix_rows_off(examples):
    from stages.core.training import uses_shared_prefix

    assert uses_shared_prefix(tiny_params(shared_prefix=True).train)
    assert not uses_shared_prefix(tiny_params(shared_prefix=True, attention="varlen").train)
