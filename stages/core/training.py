"""The training loop and its pieces: batching and packing, the loss head, backends, checkpoints.

Speed without changing the maths (docs/training.md):
- Padding-free packing: a micro-batch's records are concatenated into one row whose position ids
  restart at 0 for every record. With `attention_mask=None`, transformers (masking_utils.
  find_packed_sequence_indices) turns position-id restarts into a block-diagonal causal mask, so a
  record never attends to another one (tests/test_training_core.py proves it); no FLOP is spent on
  padding.
- The loss head projects to the 128k-token vocabulary only at positions that have a label (on CPU),
  or uses liger-kernel's fused linear cross-entropy (on CUDA), which never materialises the logits.
- train.compile: on compiles the transformer body (torch.compile, dynamic shapes): fused kernels
  for the norms, rotary embeddings, activations and LoRA's extra products; the heads stay eager.
- The loss of an optimizer step is the sum over all its labelled tokens divided by their number,
  however the step's records are split into micro-batches or processes, so packing, micro-batch
  size and data parallelism give the same gradients as one big padded batch.

Everything here takes values (params objects, example lists, a model), never paths from
params.yaml, so tests call it directly; stages/train.py does the I/O around it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import attention  # registers train.attention varlen with transformers
from .chat import IGNORE_INDEX, PAD_ID, EncodedExample
from .params import ConfigError
from .progress import progress


class TrainingError(Exception):
    """Training could not finish (out of memory, diverged); the message says what to change."""


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """Right-padded rows (attention_mask) or packed rows (position_ids, attention_mask None)."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None
    # targets[b, t] = the label of token t+1 of the same record (IGNORE_INDEX at a record's end).
    targets: torch.Tensor | None = None
    # Tokens of the records as if each stood alone (shared-prefix rows compute fewer); None = computed.
    record_tokens: int | None = None

    def __post_init__(self):
        if self.targets is None:
            shifted = torch.full_like(self.labels, IGNORE_INDEX)
            shifted[:, :-1] = self.labels[:, 1:]
            self.targets = shifted

    @property
    def num_label_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def num_computed_tokens(self) -> int:
        if self.attention_mask is None or self.attention_mask.dim() == 4:
            return int(self.input_ids.numel())
        return int(self.attention_mask.sum())

    @property
    def num_real_tokens(self) -> int:
        """The records' tokens (a shared prefix counted once per record): what the data holds."""
        return self.record_tokens if self.record_tokens is not None else self.num_computed_tokens

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.labels),
                     move(self.position_ids), move(self.targets), self.record_tokens)


def collate(examples: list[EncodedExample], pad_id: int = PAD_ID) -> Batch:
    """Right-padded batch with the chat format's pad token; pads are masked out of attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return Batch(ids, mask, labels)


def pack(examples: list[EncodedExample]) -> Batch:
    """One padding-free row: records concatenated, position ids restarting at 0 per record.

    Targets are shifted inside each record, so no record's last token is trained to predict the
    next record's first token.
    """
    ids, positions, labels, targets = [], [], [], []
    for example in examples:
        n = len(example.input_ids)
        ids += example.input_ids
        positions += range(n)
        labels += example.labels
        targets += list(example.labels[1:]) + [IGNORE_INDEX]
    as_row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
    return Batch(as_row(ids), None, as_row(labels), as_row(positions), as_row(targets))


def pack_groups(examples: list[EncodedExample], max_tokens: int) -> list[list[EncodedExample]]:
    """Consecutive records grouped into rows of at most max_tokens (a longer record gets its own row)."""
    groups, current, used = [], [], 0
    for example in examples:
        n = len(example.input_ids)
        if current and used + n > max_tokens:
            groups.append(current)
            current, used = [], 0
        current.append(example)
        used += n
    if current:
        groups.append(current)
    return groups


# --------------------------------------------------------------------------------------------------
# Shared-prefix packing
#
# Records with the same system prompt begin with the same tokens (the system turn and the template's
# user header: 45% of SmolLM2's training tokens on the embedded data). A segment computes that prefix
# once and appends each record's remaining tokens: [prefix, r1, r2, ...]. Each record's tokens attend
# to the prefix and to themselves only, and their position ids continue from the prefix length, as
# if each record stood alone. Attention is causal, so the prefix's hidden states equal each record's
# own copy and each record's loss is unchanged; the prefix's gradient is the sum of what each copy
# would receive. Only a prefix that is masked out of the loss is shared (prompt tokens, completion-only
# training), so no label is counted once instead of once per record.
# --------------------------------------------------------------------------------------------------

@dataclass
class Segment:
    """A prefix of `prefix_len` tokens (0 = none) shared by `records`, each contributing its tokens
    after the prefix. A record that shares nothing is a segment of its own with prefix_len 0."""
    prefix_len: int
    records: list[EncodedExample]

    @property
    def tokens(self) -> int:
        return self.prefix_len + sum(len(r.input_ids) - self.prefix_len for r in self.records)


def _shareable(example: EncodedExample) -> bool:
    """The prefix and the token after it are out of the loss (so the prefix's last token, whose target
    is the first token after it, predicts nothing), and the record has tokens beyond its prefix."""
    p = example.prefix_len
    return 0 < p < len(example.input_ids) and all(label == IGNORE_INDEX for label in example.labels[:p + 1])


def segments(examples: list[EncodedExample], max_tokens: int) -> list[Segment]:
    """Records grouped by identical shareable prefix, in order of first appearance; a segment grows
    until it would pass max_tokens, then the next record with that prefix opens a new one."""
    out: list[Segment] = []
    open_segment: dict[tuple[int, ...], Segment] = {}
    for example in examples:
        if not _shareable(example):
            out.append(Segment(0, [example]))
            continue
        key = tuple(example.input_ids[:example.prefix_len])
        segment = open_segment.get(key)
        if segment is not None and segment.tokens + len(example.input_ids) - example.prefix_len <= max_tokens:
            segment.records.append(example)
            continue
        segment = Segment(example.prefix_len, [example])
        open_segment[key] = segment
        out.append(segment)
    return out


def pack_segments(row: list[Segment]) -> Batch:
    """One row of segments with its 4-D attention mask [1, 1, T, T] (True = may attend)."""
    ids, positions, labels, targets, seg_of, part_of = [], [], [], [], [], []
    for s, segment in enumerate(row):
        p = segment.prefix_len
        if p:
            first = segment.records[0]
            ids += first.input_ids[:p]
            positions += range(p)
            labels += first.labels[:p]
            targets += list(first.labels[1:p]) + [IGNORE_INDEX]  # the token after the prefix is a prompt token
            seg_of += [s] * p
            part_of += [-1] * p
        for r, record in enumerate(segment.records):
            tail_ids, tail_labels = record.input_ids[p:], record.labels[p:]
            n = len(tail_ids)
            ids += tail_ids
            positions += range(p, p + n)
            labels += tail_labels
            targets += list(tail_labels[1:]) + [IGNORE_INDEX]
            seg_of += [s] * n
            part_of += [r] * n
    seg_t, part_t = torch.tensor(seg_of), torch.tensor(part_of)
    n = len(ids)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    # query q may see key k: same segment, k <= q, and k is in the prefix or in q's own record.
    mask = causal & (seg_t[:, None] == seg_t[None, :]) & ((part_t[None, :] == -1) | (part_t[:, None] == part_t[None, :]))
    as_row = lambda values: torch.tensor([values], dtype=torch.long)  # noqa: E731
    record_tokens = sum(len(r.input_ids) for segment in row for r in segment.records)
    return Batch(as_row(ids), mask[None, None], as_row(labels), as_row(positions), as_row(targets), record_tokens)


def pack_segment_rows(segs: list[Segment], max_tokens: int) -> list[list[Segment]]:
    """Consecutive segments grouped into rows of at most max_tokens (a longer one gets its own row)."""
    rows, current, used = [], [], 0
    for segment in segs:
        n = segment.tokens
        if current and used + n > max_tokens:
            rows.append(current)
            current, used = [], 0
        current.append(segment)
        used += n
    if current:
        rows.append(current)
    return rows


def uses_shared_prefix(train, backend: str = "hf") -> bool:
    """train.shared_prefix applies to packed rows under attention that takes a 4-D mask (SDPA, eager;
    not flash-attention or varlen, which attend record by record with no mask) with the transformers
    backend."""
    return bool(train.packing and train.shared_prefix and train.attention in ("sdpa", "eager") and backend == "hf")


def micro_batch_groups(examples: list[EncodedExample], batch_size: int, packing: bool, pack_tokens: int,
                       shared_prefix: bool = False) -> tuple[str, list]:
    """How micro_batches splits a step's records: ("segments", rows of Segments) for shared-prefix
    rows, ("packed", groups of records) for packed rows, ("padded", groups of batch_size records)."""
    if packing and shared_prefix:
        segs = segments(examples, pack_tokens)
        if any(len(segment.records) > 1 for segment in segs):
            return "segments", pack_segment_rows(segs, pack_tokens)
    if packing:
        return "packed", pack_groups(examples, pack_tokens)
    return "padded", [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]


def micro_batches(examples: list[EncodedExample], batch_size: int, packing: bool, pack_tokens: int,
                  pad_id: int = PAD_ID, shared_prefix: bool = False) -> list[Batch]:
    """A step's (or a rank's share of a step's) records as padded or packed micro-batches; with
    shared_prefix (and packing), records that share a prompt prefix compute it once per row."""
    kind, groups = micro_batch_groups(examples, batch_size, packing, pack_tokens, shared_prefix)
    if kind == "segments":
        return [pack_segments(row) for row in groups]
    if kind == "packed":
        return [pack(group) for group in groups]
    return [collate(group, pad_id) for group in groups]


def loss_targets(example: EncodedExample) -> int:
    """Positions of a record that have a loss target: its labels after the first (each token predicts
    the next one's label) that are not IGNORE_INDEX."""
    return sum(1 for t in example.labels[1:] if t != IGNORE_INDEX)


def most_labelled_positions(examples: list[EncodedExample], train, shared_prefix: bool, world_size: int = 1) -> int:
    """The most labelled positions (loss targets) in any micro-batch of this run: every epoch's steps
    (epoch_steps), each process's share of them (shard), split as micro_batches splits them. Counted
    from the records, without building a tensor. This is what the loss head computes logits for, so
    fused_loss auto's memory rule uses it rather than a packed row's whole length (which took liger,
    2.7x slower on an H200, for rows whose labelled logits would have fitted)."""
    targets = {id(e): loss_targets(e) for e in examples}  # counted once, read every epoch
    per_step = train.batch_size * train.gradient_accumulation_steps
    most = 0
    for epoch in range(train.epochs):
        for indices in epoch_steps(len(examples), per_step, epoch, train.seed, world_size):
            for rank in range(world_size):
                mine = [examples[i] for i in shard(indices, rank, world_size)]
                kind, groups = micro_batch_groups(mine, train.batch_size, train.packing, train.pack_tokens,
                                                  shared_prefix)
                for group in groups:
                    records = [r for seg in group for r in seg.records] if kind == "segments" else group
                    most = max(most, sum(targets[id(r)] for r in records))
    return most


def batches(examples: list[EncodedExample], batch_size: int, seed: int | None) -> list[list[EncodedExample]]:
    """Micro-batches in a seeded random order (no shuffling when seed is None)."""
    order = list(range(len(examples)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return [[examples[i] for i in order[start:start + batch_size]] for start in range(0, len(order), batch_size)]


def epoch_steps(num_examples: int, records_per_step: int, epoch: int, seed: int, world_size: int = 1) -> list[list[int]]:
    """Record indices of each optimizer step of an epoch, in a order fixed by (seed, epoch).

    A last step with fewer records than processes is merged into the step before it, so every
    process gets at least one record in every step (DDP needs one backward per process per step).
    """
    order = list(range(num_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    steps = [order[i:i + records_per_step] for i in range(0, num_examples, records_per_step)]
    if len(steps) > 1 and len(steps[-1]) < world_size:
        steps[-2].extend(steps.pop())
    return steps


def shard(indices: list[int], rank: int, world_size: int) -> list[int]:
    return indices[rank::world_size]


# --------------------------------------------------------------------------------------------------
# Loss heads
# --------------------------------------------------------------------------------------------------

def _unwrap(model):
    inner = getattr(model, "module", model)  # DDP / FSDP wrapper
    if isinstance(inner, LossModule):
        inner = inner.model
    inner = getattr(inner, "module", inner)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _body_and_head(model):
    """The transformer body and the LM head of a (peft-wrapped, DDP-wrapped) causal LM."""
    inner = _unwrap(model)
    return inner.model, inner.lm_head


def _hidden(body, batch: Batch) -> torch.Tensor:
    if batch.attention_mask is not None and batch.attention_mask.dim() == 4:
        # Shared-prefix rows: transformers uses a 4-D mask as given. SDPA takes it as booleans (True =
        # attend); eager attention adds it to the scores, so it needs 0 / -inf.
        mask = batch.attention_mask
        if getattr(body.config, "_attn_implementation", "sdpa") == "eager":
            dtype = next(body.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        return body(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask,
                    use_cache=False).last_hidden_state
    if batch.attention_mask is None:
        # Packed: no 2-D mask, so transformers derives the block-diagonal mask from position_ids; or,
        # under attention varlen, each record attends to itself from the boundaries handed over.
        implementation = getattr(getattr(body, "config", None), "_attn_implementation", None)
        boundaries = attention.packed_boundaries(batch.position_ids) if implementation == attention.NAME else {}
        return body(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None,
                    use_cache=False, **boundaries).last_hidden_state
    return body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state


def completion_loss_sum(model, batch: Batch, head_mode: str = "completion",
                        hidden_fn: Callable = _hidden) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there were.

    head_mode "completion": logits only at labelled positions; "liger": fused linear cross-entropy
    (CUDA); "full": logits at every position (what a plain Trainer does; used by the benchmark).
    hidden_fn: _hidden, or its compiled form (LossModule with compiled=True).
    """
    body, head = _body_and_head(model)
    hidden = hidden_fn(body, batch)
    targets = batch.targets
    keep = targets != IGNORE_INDEX
    count = int(keep.sum())
    if head_mode == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, hidden[keep], targets[keep])
    elif head_mode == "full":
        logits = head(hidden).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    else:
        logits = head(hidden[keep]).float()
        loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    return loss, count


class LossModule(torch.nn.Module):
    """model + loss head as one module, so DDP/FSDP wrap the whole forward (their hooks need it)."""

    def __init__(self, model, head_mode: str = "completion", compiled: bool = False):
        super().__init__()
        self.model = model
        self.head_mode = head_mode
        # Only the body is compiled: the heads select labelled positions (a shape that depends on the
        # data) or call liger's own kernels. dynamic=True: one graph for every row length, instead of
        # a recompilation for each new packed length. The graph is cached on _hidden's code, so a new
        # model of the same architecture (the next fit in this process) reuses it.
        self.hidden_fn = torch.compile(_hidden, dynamic=True) if compiled else _hidden

    def forward(self, input_ids, attention_mask, labels, position_ids, targets):
        batch = Batch(input_ids, attention_mask, labels, position_ids, targets)
        loss, _ = completion_loss_sum(self.model, batch, self.head_mode, self.hidden_fn)
        return loss


def _forward_loss(module, batch: Batch) -> torch.Tensor:
    return module(batch.input_ids, batch.attention_mask, batch.labels, batch.position_ids, batch.targets)


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate_loss(model, examples: list[EncodedExample], batch_size: int, device, packing: bool = False,
                  pack_tokens: int = 4096, head_mode: str = "completion", dist_info=None,
                  sharded_module=None, pad_id: int = PAD_ID, shared_prefix: bool = False) -> float:
    """Mean completion-token loss over examples (perplexity is its exp).

    Under DDP each process scores its share and the sums are all-reduced. sharded_module: the
    FSDP-wrapped LossModule of `model`; the loss then goes through it (its forward gathers the
    embeddings and LM head) and every process runs as many forwards (see equalize_micro_batches).
    """
    net = model if sharded_module is None else sharded_module
    was_training = net.training
    net.eval()
    distributed = dist_info is not None and dist_info.world_size > 1
    mine = examples
    if distributed:
        mine = [examples[i] for i in shard(list(range(len(examples))), dist_info.rank, dist_info.world_size)]
    micro = micro_batches(mine, batch_size, packing, pack_tokens, pad_id, shared_prefix) if mine else []
    real = len(micro)
    if sharded_module is not None:
        if not micro:  # fewer validation records than processes: score a record with weight 0
            micro = micro_batches(examples[:1], batch_size, packing, pack_tokens, pad_id, shared_prefix)
        micro = equalize_micro_batches(micro, dist_info)
    total, count = 0.0, 0
    for k, batch in enumerate(micro):
        batch = batch.to(device)
        if sharded_module is not None:
            loss, n = _forward_loss(sharded_module, batch), int((batch.targets != IGNORE_INDEX).sum())
        else:
            loss, n = completion_loss_sum(model, batch, "completion" if head_mode == "full" else head_mode)
        if k < real:
            total += float(loss)
            count += n
    if distributed:
        import torch.distributed as dist

        sums = torch.tensor([total, float(count)], dtype=torch.float64, device=dist_info.device)
        dist.all_reduce(sums)
        total, count = float(sums[0]), int(sums[1])
    net.train(was_training)
    return total / max(1, count)


def equalize_micro_batches(micro: list, dist_info) -> list:
    """Pad this process's micro-batches (repeating its last one, to be weighted 0) to the largest
    count over the processes: under FSDP every forward and backward all-gathers and reduce-scatters,
    so a process that stopped early would leave the others waiting."""
    import torch.distributed as dist

    count = torch.tensor([len(micro)], dtype=torch.int64, device=dist_info.device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return micro + [micro[-1]] * (int(count[0]) - len(micro))


# --------------------------------------------------------------------------------------------------
# Choices: backend, method, loss head, distribution
# --------------------------------------------------------------------------------------------------

def package_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@dataclass(frozen=True)
class Choice:
    value: str
    note: str = ""


def select_backend(requested: str, allow_fallback: bool, cuda: bool, unsloth_installed: bool) -> Choice:
    """hf or unsloth. auto picks unsloth only when it can run; an explicit unsloth that cannot run
    is a ConfigError unless train.allow_backend_fallback is true."""
    if requested == "hf":
        return Choice("hf")
    missing = []
    if not cuda:
        missing.append("a CUDA GPU (none is visible to torch)")
    if not unsloth_installed:
        missing.append("the unsloth package (pip install -r requirements-gpu.txt)")
    if not missing:
        return Choice("unsloth")
    why = "unsloth needs " + " and ".join(missing)
    if requested == "auto":
        return Choice("hf", f"backend auto: {why}; using hf (transformers + peft)")
    if allow_fallback:
        return Choice("hf", f"train.backend is unsloth but {why}; falling back to hf because "
                            "train.allow_backend_fallback is true")
    raise ConfigError(f"train.backend: unsloth was asked for but {why}. Set train.backend: hf (or auto), "
                      "or train.allow_backend_fallback: true to fall back")


def check_method(method: str, cuda: bool, bitsandbytes_installed: bool) -> None:
    if method != "qlora":
        return
    missing = []
    if not cuda:
        missing.append("a CUDA GPU (bitsandbytes 4-bit kernels do not run on CPU)")
    if not bitsandbytes_installed:
        missing.append("the bitsandbytes package (pip install -r requirements-gpu.txt)")
    if missing:
        raise ConfigError("train.method: qlora needs " + " and ".join(missing)
                          + "; use method lora on this machine")


# Bytes one labelled position's logits cost in the "completion" head, forward + backward: the bf16
# logits, their fp32 upcast in the cross-entropy and its fp32 gradient, and the bf16 gradient
# (2 + 4 + 4 + 2). Measured on an H200: 1,024 labelled positions x 128,256 vocab took 1,535 MiB,
# 12.25 bytes each (docs/training.md, "Loss head").
LOGIT_BYTES = 12


def labelled_logits_mb(labelled_positions: int, vocab_size: int) -> float:
    """MiB the logits at `labelled_positions` positions take in the completion head (forward + backward)."""
    return labelled_positions * vocab_size * LOGIT_BYTES / 2 ** 20


def select_loss_head(fused_loss: str, cuda: bool, liger_installed: bool, *,
                     labelled_positions: int | None = None, vocab_size: int | None = None,
                     budget_mb: float | None = None) -> Choice:
    """The loss head. auto chooses by memory: logits at labelled positions (faster: 2.7x liger's
    fused cross-entropy on an H200) when the largest micro-batch's labelled logits fit `budget_mb`,
    liger's fused linear cross-entropy (never materialises the logits) when they do not. Without
    the sizes (labelled_positions, vocab_size, budget_mb) auto cannot judge memory and keeps liger
    on CUDA. On a CPU, or without liger-kernel, always logits at labelled positions."""
    if fused_loss == "none":
        return Choice("completion")
    usable = cuda and liger_installed
    why = "liger-kernel needs CUDA (Triton kernels)" if not cuda else "liger-kernel is not installed"
    if fused_loss == "liger":
        if usable:
            return Choice("liger")
        raise ConfigError(f"train.fused_loss: liger was asked for but {why}; use auto or none")
    if not usable:
        return Choice("completion", f"fused_loss auto: {why}; computing logits at labelled positions only")
    if labelled_positions is None or vocab_size is None or budget_mb is None:
        return Choice("liger", "fused_loss auto: no micro-batch size given; liger fused cross-entropy")
    need = labelled_logits_mb(labelled_positions, vocab_size)
    if need <= budget_mb:
        return Choice("completion", f"fused_loss auto: logits at {labelled_positions} labelled positions take "
                                    f"{need:,.0f} MiB <= fused_loss_budget_mb {budget_mb:,.0f}; computing them "
                                    "(faster than liger when they fit)")
    return Choice("liger", f"fused_loss auto: logits at {labelled_positions} labelled positions would take "
                           f"{need:,.0f} MiB > fused_loss_budget_mb {budget_mb:,.0f}; liger fused cross-entropy")


def records_per_step(lengths: list[int], tokens_per_step: int, default: int) -> int:
    """Records per optimizer step. With a token budget (tokens_per_step > 0): as many records as
    the budget holds at the data's mean record length, at least 1 and at most all of them;
    otherwise `default` (batch_size x gradient_accumulation_steps)."""
    if tokens_per_step <= 0 or not lengths:
        return default
    mean = sum(lengths) / len(lengths)
    return max(1, min(len(lengths), int(tokens_per_step // mean)))


def with_token_budget(train, examples: list[EncodedExample]):
    """TrainParams whose batch_size x gradient_accumulation_steps is the token budget's records per
    step (records_per_step), so fit() runs steps of about train.tokens_per_step tokens. Packed: one
    step's records are split into rows of pack_tokens (micro-batches). Padded: micro-batches of as
    many records as pack_tokens holds. Unchanged when tokens_per_step is 0."""
    default = train.batch_size * train.gradient_accumulation_steps
    lengths = [len(e.input_ids) for e in examples]
    records = records_per_step(lengths, train.tokens_per_step, default)
    if train.tokens_per_step <= 0:
        return train
    if train.packing:
        shape = {"batch_size": records, "gradient_accumulation_steps": 1}
    else:
        per_micro = max(1, min(records, records_per_step(lengths, train.pack_tokens, 1)))
        shape = {"batch_size": per_micro, "gradient_accumulation_steps": max(1, round(records / per_micro))}
    lr = scaled_learning_rate(train.learning_rate, train.lr_scaling, default,
                              shape["batch_size"] * shape["gradient_accumulation_steps"])
    return train.model_copy(update={**shape, "learning_rate": lr})


def scaled_learning_rate(lr: float, rule: str, records_before: int, records_now: int) -> float:
    """learning_rate for steps of `records_now` records when it was set for `records_before`.

    linear (the default): lr x now / before. AdamW's update has about the same size whatever the
    gradient's scale, so k times fewer steps move the weights about 1/k as far at the same rate; a
    fine-tune of a few epochs stays in that regime (Goyal et al. 2017 for the linear rule).
    sqrt: lr x sqrt(now / before), the square-root rule that the SDE view of adaptive optimizers gives
    when many steps remain and gradient noise dominates (Malladi et al. 2022).
    none: lr unchanged.

    Measured (`python -m bench.lr_scaling`, SmolLM2-135M LoRA, one epoch, docs/training.md): 29-record
    steps against the preset's 8 ended at a validation loss of 1.598 (linear), 1.830 (sqrt) and 2.196
    (none) against 1.643; 58-record steps at 1.017 (linear) and 1.384 (sqrt) against 0.843. Without
    scaling, the H200 kit's 232-record steps ended one epoch at 11.40 against the baseline's 7.83."""
    if rule == "none" or records_before <= 0 or records_now == records_before:
        return lr
    if rule == "linear":
        return lr * records_now / records_before
    return lr * math.sqrt(records_now / records_before)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """torchrun / accelerate launch set WORLD_SIZE, RANK, LOCAL_RANK: join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=device)
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, device)


def select_distributed(mode: str, method: str, world_size: int) -> str:
    if world_size <= 1:
        return "none"
    if mode == "auto":
        return "fsdp" if method == "full" else "ddp"
    if mode == "fsdp" and method == "qlora":
        raise ConfigError("train.distributed: fsdp does not support qlora here; use ddp")
    return mode


def select_compile(requested: str, backend: str, distributed: str, cuda: bool) -> Choice:
    """train.compile: "on" compiles the transformer body (LossModule); refused where it cannot work.

    Inductor generates Triton kernels on CUDA and C++ on a CPU, so the CPU needs a C++ compiler.
    unsloth patches the model with its own kernels (and compiles them itself); FSDP's flat
    parameters under a compiled submodule are not supported here."""
    if requested == "off":
        return Choice("off")
    if backend == "unsloth":
        raise ConfigError("train.compile: on works with the transformers backend; unsloth compiles its own "
                          "kernels (set train.backend: hf, or train.compile: off)")
    if distributed == "fsdp":
        raise ConfigError("train.compile: on is not supported under FSDP here; use ddp or train.compile: off")
    if cuda and not package_available("triton"):
        raise ConfigError("train.compile: on needs triton on CUDA (it comes with torch's CUDA wheels); "
                          "install it or set train.compile: off")
    if not cuda and not cpp_compiler():
        raise ConfigError("train.compile: on needs a C++ compiler on a CPU (torch.compile generates C++): "
                          "none found (CXX, g++, clang++, c++); install one or set train.compile: off")
    return Choice("on", "train.compile on: the first step compiles the model body (tens of seconds to "
                        "minutes); later steps reuse it for any row length")


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use on a CPU, or None."""
    import shutil

    named = os.environ.get("CXX")
    return shutil.which(named) if named else next(
        (path for path in map(shutil.which, ("g++", "clang++", "c++")) if path), None)


def wrap_distributed(module: torch.nn.Module, kind: str, dist_info: DistInfo):
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        return DDP(module, device_ids=ids)
    if kind == "fsdp":
        # FSDP2 (fully_shard): each decoder layer is its own shard group, the rest (embeddings, final
        # norm, LM head) belongs to the root. It runs on CUDA (NCCL) and on CPU (gloo), so the
        # two-process test covers the same code the cluster runs.
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
        for layer in [m for m in module.modules() if type(m).__name__.endswith("DecoderLayer")]:
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
    return module


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------

def rss_peak_mb() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


def memory_snapshot(device: torch.device) -> dict:
    out = {"rss_peak_mb": round(rss_peak_mb(), 1)}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["cuda_max_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    return out


def release_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def oom_message(train, device: torch.device, phase: str) -> str:
    """What to change after a CUDA out-of-memory, with the peak it reached."""
    snap = memory_snapshot(device) if device.type == "cuda" else {}
    total = torch.cuda.get_device_properties(device).total_memory / 2**20 if device.type == "cuda" else 0
    peak = (f"peak allocated {snap.get('cuda_max_allocated_mb', 0):,.0f} MiB, reserved "
            f"{snap.get('cuda_max_reserved_mb', 0):,.0f} MiB of {total:,.0f} MiB")
    remedies = []
    if train.packing:
        remedies.append(f"lower train.pack_tokens (now {train.pack_tokens}): the step still holds "
                        "batch_size x gradient_accumulation_steps records, in more, shorter packed rows")
    else:
        remedies.append(f"lower train.batch_size (now {train.batch_size}) and raise "
                        f"train.gradient_accumulation_steps (now {train.gradient_accumulation_steps})")
    if not train.gradient_checkpointing:
        remedies.append("set train.gradient_checkpointing: true")
    if train.method != "full" and train.lora.r > 8:
        remedies.append(f"lower train.lora.r (now {train.lora.r})")
    remedies.append("lower model.max_seq_length (longer records are dropped by preprocess)")
    if train.method != "qlora":
        remedies.append("use train.method: qlora (4-bit base weights)")
    if train.fused_loss == "none":
        remedies.append("set train.fused_loss: auto (fused cross-entropy never builds the 128k-wide logits)")
    return (f"CUDA out of memory during {phase}: {peak}. Remedies: " + "; ".join(remedies)
            + ". `python -m stages.dry_run` prints a memory estimate for a configuration.")


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------

# Tensors in safetensors, everything else as JSON in the same file's header: loading a checkpoint
# parses data and never runs code (a pickle, what torch.save writes, can run any code on load).
CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "llama-finetune-checkpoint/1"
# What older versions wrote (torch.save, a pickle): refused, never unpickled.
LEGACY_CHECKPOINT_FILE = "checkpoint.pt"

# The source files whose code decides what training computes (relative to the stages package). A
# change to any of them starts training afresh instead of resuming a checkpoint of the old code.
# tests/test_training_core.py keeps this in step with what stages/train.py imports.
TRAINING_CODE = ("train.py", "core/training.py", "core/attention.py", "core/modeling.py", "core/chat.py",
                 "core/params.py", "core/determinism.py", "core/progress.py", "core/schedule.py")
# The libraries whose versions change the numbers (a checkpoint of another version starts afresh).
TRAINING_LIBRARIES = ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers",
                      "liger-kernel", "unsloth", "bitsandbytes")


def training_code_hashes(files: tuple[str, ...] = TRAINING_CODE) -> dict[str, str]:
    """{path: sha256 of its bytes} of the training code, paths relative to the repository."""
    package = Path(__file__).resolve().parents[1]
    return {f"stages/{name}": hashlib.sha256((package / name).read_bytes()).hexdigest() for name in files}


def library_versions(names: tuple[str, ...] = TRAINING_LIBRARIES) -> dict[str, str]:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def run_identity(params_dict: dict, data_hash: str, world_size: int = 1, code: dict | None = None,
                 libraries: dict | None = None) -> dict:
    """What a run depends on: params (the CPU thread count too: it changes the numbers on some CPUs),
    data, process count, training code and library versions."""
    return {"params": {"cpu": params_dict.get("cpu"), "model": params_dict.get("model"), "train": params_dict.get("train")},
            "data": data_hash, "world_size": world_size,
            "code": training_code_hashes() if code is None else code,
            "libraries": library_versions() if libraries is None else libraries}


def resume_key(params_dict: dict, data_hash: str, world_size: int = 1, code: dict | None = None,
               libraries: dict | None = None) -> str:
    """Identity of a run: a checkpoint is resumed only by the run with the same key."""
    return identity_key(run_identity(params_dict, data_hash, world_size, code, libraries))


def identity_key(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def identity_changes(old: dict | None, new: dict | None) -> str:
    """Why two run identities differ, in words ("the training code changed (stages/train.py)")."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return "other params, data, code or library versions"
    reasons = []
    if old.get("params") != new.get("params"):
        reasons.append("the model/train params changed")
    if old.get("data") != new.get("data"):
        reasons.append("the training data changed")
    if old.get("world_size") != new.get("world_size"):
        reasons.append(f"the process count changed ({old.get('world_size')} -> {new.get('world_size')})")
    old_code, new_code = old.get("code") or {}, new.get("code") or {}
    changed = sorted(name for name in set(old_code) | set(new_code) if old_code.get(name) != new_code.get(name))
    if changed:
        reasons.append(f"the training code changed ({', '.join(changed)})")
    old_libs, new_libs = old.get("libraries") or {}, new.get("libraries") or {}
    libs = [f"{name} {old_libs.get(name, 'absent')} -> {new_libs.get(name, 'absent')}"
            for name in sorted(set(old_libs) | set(new_libs)) if old_libs.get(name) != new_libs.get(name)]
    if libs:
        reasons.append(f"library versions changed ({', '.join(libs)})")
    return "; ".join(reasons) or "other params, data, code or library versions"


def _is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Full (unsharded) copies of the trainable parameters, on the CPU. Under FSDP this gathers the
    shards, a collective: every process must call it."""
    inner = getattr(model, "module", model)
    state = {}
    for name, p in inner.named_parameters():
        if p.requires_grad:
            value = p.detach()
            state[name] = (value.full_tensor() if _is_sharded(value) else value).to("cpu", copy=True)
    return state


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    """The inverse of trainable_state; under FSDP each process keeps its own shard of the full value."""
    from torch.distributed.tensor import distribute_tensor

    inner = getattr(model, "module", model)
    params = dict(inner.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            target = params[name]
            if _is_sharded(target):
                local = value.to(target.device, target.dtype)
                target.copy_(distribute_tensor(local, target.device_mesh, target.placements, src_data_rank=None))
            else:
                target.copy_(value.to(target.device))


def _encode(value, tensors: dict[str, torch.Tensor]):
    """A JSON-able value with every tensor moved to `tensors` and replaced by {"__tensor__": name}.
    Tuples and dicts with non-string keys (the optimizer's parameter indices) keep their types."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensor = value.detach().to("cpu")
        # safetensors refuses tensors that share memory: views are copied
        tensors[name] = tensor.clone() if tensor._base is not None or not tensor.is_contiguous() else tensor
        return {"__tensor__": name}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint state holds a {type(value).__name__}, which is not saved")


def _decode(value, tensors):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"__tensor__"}:
        return tensors(value["__tensor__"])
    if set(value) == {"__items__"}:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
    if set(value) == {"__tuple__"}:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    return {k: _decode(v, tensors) for k, v in value.items()}


def save_checkpoint(directory: Path, state: dict) -> str | None:
    """Write the checkpoint atomically (a .tmp file, then rename). A failure to write it is not a
    failure of training: the .tmp is removed and a warning returned (None when written)."""
    from safetensors.torch import save_file

    tmp = directory / (CHECKPOINT_FILE + ".tmp")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        header = json.dumps(_encode(state, tensors))
        save_file(tensors, str(tmp), metadata={"format": CHECKPOINT_FORMAT, "state": header})
        os.replace(tmp, directory / CHECKPOINT_FILE)
        return None
    except Exception as exc:  # disk full, read-only, permissions: training goes on
        tmp.unlink(missing_ok=True)
        return (f"warning: checkpoint not written to {directory / CHECKPOINT_FILE} "
                f"({type(exc).__name__}: {exc}); training continues, but an interruption now resumes "
                "from the previous checkpoint, if any")
    except BaseException:  # Ctrl-C or SIGTERM mid-write: the previous checkpoint stays whole
        tmp.unlink(missing_ok=True)
        raise


def _read_checkpoint(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        state = _decode(json.loads(metadata["state"]), handle.get_tensor)
    if not isinstance(state, dict):
        raise ValueError("the state is not a JSON object")
    return state


def load_checkpoint(directory: Path | None, key: str, identity: dict | None = None) -> tuple[dict | None, str]:
    """(state, message): the state when it belongs to this run, else None and why. `identity`
    (run_identity) lets the message say what changed since the checkpoint was written."""
    if directory is None:
        return None, "no checkpoint directory"
    legacy = directory / LEGACY_CHECKPOINT_FILE
    refused = (f"refused {legacy}: a pickle checkpoint (torch.save) from an older version, which could "
               "run code when loaded, so it is never loaded; delete it. ") if legacy.exists() else ""
    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        return None, f"{refused}no checkpoint in {directory}: starting fresh"
    try:
        state = _read_checkpoint(path)
    except Exception as exc:  # a torn or foreign file must not stop training
        return None, f"{refused}checkpoint {path} is unreadable ({type(exc).__name__}: {exc}): starting fresh"
    if state.get("resume_key") != key:
        why = identity_changes(state.get("identity"), identity)
        return None, f"{refused}checkpoint {path} is of another run (resume key differs: {why}): starting fresh"
    return state, (f"{refused}resuming from {path} at optimizer step {state['step']} "
                   f"(epoch {state['epoch'] + 1})")


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------

@dataclass
class FitResult:
    final_train_loss: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    best_step: int
    steps: int
    epochs_run: float
    early_stopped: bool
    train_seconds: float
    eval_seconds: float
    real_tokens: int
    label_tokens: int
    resumed_from_step: int
    history: list[dict] = field(default_factory=list)
    memory_per_epoch: list[dict] = field(default_factory=list)
    # cumulative train_seconds and real_tokens at the end of each epoch: throughput after the first
    # epoch (which meets every packed row length for the first time) is the steady-state figure
    epoch_marks: list[dict] = field(default_factory=list)


def fit(model, train_examples: list[EncodedExample], val_examples: list[EncodedExample], train, *,
        device: torch.device, head_mode: str = "completion", checkpoint_dir: Path | None = None,
        run_key: str = "", logger=None, dist_info: DistInfo | None = None, distributed: str = "none",
        log: Callable[[str], None] = print, stop_after_steps: int | None = None,
        pad_id: int = PAD_ID, run_identity: dict | None = None, shared_prefix: bool | None = None) -> FitResult:
    """Train `model` (a peft model, or a full model) in place; on return it holds the best weights.

    train: TrainParams. logger: a dvclive Live (main process) or None. checkpoint_dir: a checkpoint
    is written at every evaluation and resumed when its run_key matches (run_identity, stored with
    it, lets a mismatch say what changed). stop_after_steps: stop
    (as if interrupted) after that many optimizer steps, for tests of resumption. pad_id: the chat
    format's pad token (unpacked micro-batches only).
    """
    dist_info = dist_info or DistInfo(device=device)
    world = dist_info.world_size
    if shared_prefix is None:
        shared_prefix = uses_shared_prefix(train)
    torch.manual_seed(train.seed)
    random.seed(train.seed)
    # train.compile is checked by select_compile (the train stage); evaluation stays eager (no_grad,
    # other row lengths: a second graph would cost more compile time than the few rows save).
    module = wrap_distributed(LossModule(model, head_mode, compiled=train.compile == "on"), distributed, dist_info)
    fsdp = distributed == "fsdp"
    if fsdp and checkpoint_dir is not None:
        # The optimizer state is sharded across processes; saving and restoring it is not
        # implemented, so an FSDP run neither writes nor resumes checkpoints (DDP runs do).
        log("checkpoints: not written under FSDP (an interrupted FSDP run starts again)")
        checkpoint_dir = None
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("train: the model has no trainable parameters (check lora.target_modules)")
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)
    records_per_step = train.batch_size * train.gradient_accumulation_steps
    steps_per_epoch = len(epoch_steps(len(train_examples), records_per_step, 0, train.seed, world))
    total_steps = steps_per_epoch * train.epochs
    scheduler = warmup_cosine(optimizer, int(train.warmup_ratio * total_steps), total_steps)
    eval_points = sorted({max(1, round(k * steps_per_epoch / train.evals_per_epoch))
                          for k in range(1, train.evals_per_epoch + 1)})

    step, start_epoch, start_index = 0, 0, 0
    best_val, best_step, bad_evals = None, 0, 0
    best_state = None
    history: list[dict] = []
    memory_log: list[dict] = []
    epoch_marks: list[dict] = []  # not checkpointed: a resumed run marks the epochs it ran
    train_seconds = eval_seconds = 0.0
    real_tokens = label_tokens = 0
    window_loss, window_tokens = 0.0, 0
    last_train, last_val = None, None
    resumed_from = 0

    state, message = load_checkpoint(checkpoint_dir, run_key, run_identity)
    if checkpoint_dir is not None:
        log(message)
    if state is not None:
        load_trainable_state(model, state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, start_epoch, start_index = state["step"], state["epoch"], state["index"]
        best_val, best_step, bad_evals = state["best_val"], state["best_step"], state["bad_evals"]
        best_state, history, memory_log = state["best_state"], state["history"], state["memory"]
        train_seconds, eval_seconds = state["train_seconds"], state["eval_seconds"]
        real_tokens, label_tokens = state["real_tokens"], state["label_tokens"]
        last_train, last_val = state["last_train"], state["last_val"]
        torch.set_rng_state(state["torch_rng"])
        resumed_from = step
        if logger is not None:
            for point in history:  # the curve so far (DVC removed the plots before this run)
                logger.step = point["step"]
                for name, value in point.items():
                    if name != "step":
                        logger.log_metric(name, value)
                logger.next_step()

    model.train()
    stopped_early = state is not None and state.get("stopped", False)
    finished = stopped_early or step >= total_steps
    epoch = start_epoch
    # A bar on a terminal, a plain line every few seconds elsewhere (CI, logs), with the rate, the ETA
    # and the running loss; main process only. The epoch and evaluation lines go through it.
    bar = progress("train", total=total_steps - step, unit="step") if dist_info.is_main else None
    if bar is not None:
        log = bar_log(bar, log)
    try:
        while not finished and epoch < train.epochs:
            plan = epoch_steps(len(train_examples), records_per_step, epoch, train.seed, world)
            index = start_index if epoch == start_epoch else 0
            while index < len(plan):
                indices = plan[index]
                group = [train_examples[i] for i in indices]
                n_labels = sum(loss_targets(e) for e in group)
                mine = [train_examples[i] for i in shard(indices, dist_info.rank, world)]
                micro = micro_batches(mine, train.batch_size, train.packing, train.pack_tokens, pad_id, shared_prefix)
                real = len(micro)
                if fsdp:  # every forward/backward is a collective: all processes run as many
                    micro = equalize_micro_batches(micro, dist_info)
                began = time.perf_counter()
                step_loss = 0.0
                for k, batch in enumerate(micro):
                    batch = batch.to(dist_info.device)
                    sync = k == len(micro) - 1
                    ctx = module.no_sync() if (distributed == "ddp" and not sync) else _null()
                    weight = 1.0 if k < real else 0.0  # a padding micro-batch adds nothing
                    with ctx:
                        loss_sum = _forward_loss(module, batch) * weight
                        # Divide by the step's label tokens over all processes; DDP and FSDP average
                        # gradients over processes, so multiply by the world size to get the global sum back.
                        (loss_sum * (world / max(1, n_labels))).backward()
                    step_loss += float(loss_sum.detach())
                    if k < real:
                        real_tokens += batch.num_real_tokens
                torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                train_seconds += time.perf_counter() - began
                if world > 1:
                    step_loss = _all_reduce_sum(step_loss, dist_info)
                label_tokens += n_labels
                if not math.isfinite(step_loss):
                    raise TrainingError(f"training loss is {step_loss} at step {step + 1}; lower "
                                        f"train.learning_rate (now {train.learning_rate}) or check the data")
                window_loss += step_loss
                window_tokens += n_labels
                step += 1
                index += 1
                if bar is not None:
                    bar.update(1, loss=step_loss / max(1, n_labels))
                is_eval = index in eval_points or index == len(plan)
                if is_eval:
                    last_train = window_loss / max(1, window_tokens)
                    window_loss, window_tokens = 0.0, 0
                    began = time.perf_counter()
                    last_val = evaluate_loss(model, val_examples, train.batch_size * 4, dist_info.device,
                                             train.packing, train.pack_tokens, head_mode, dist_info,
                                             sharded_module=module if fsdp else None, pad_id=pad_id,
                                             shared_prefix=shared_prefix) if val_examples else None
                    eval_seconds += time.perf_counter() - began
                    if bar is not None and last_val is not None:
                        bar.set(val_loss=last_val)
                    point = {"step": step, "train/loss": round(last_train, 6)}
                    if last_val is not None:
                        point["val/loss"] = round(last_val, 6)
                        point["val/perplexity"] = round(math.exp(min(last_val, 50.0)), 4)
                    history.append(point)
                    if logger is not None:
                        logger.step = step
                        for name, value in point.items():
                            if name != "step":
                                logger.log_metric(name, value)
                        logger.next_step()
                    log(f"epoch {epoch + 1} step {step}/{total_steps}: train loss {last_train:.4f}"
                        + (f", val loss {last_val:.4f}" if last_val is not None else ""))
                    score = last_val if last_val is not None else last_train
                    if best_val is None or score < best_val - 1e-6:
                        best_val, best_step, bad_evals = score, step, 0
                        best_state = trainable_state(model)
                    else:
                        bad_evals += 1
                    stopped_early = bool(train.early_stopping_patience and bad_evals >= train.early_stopping_patience)
                    if index == len(plan):
                        memory_log.append({"epoch": epoch + 1, **memory_snapshot(dist_info.device)})
                        epoch_marks.append({"epoch": epoch + 1, "train_seconds": train_seconds,
                                            "real_tokens": real_tokens})
                        log(f"epoch {epoch + 1} memory: {memory_log[-1]}")
                        release_memory(dist_info.device)
                    next_epoch, next_index = (epoch + 1, 0) if index == len(plan) else (epoch, index)
                    if checkpoint_dir is not None and dist_info.is_main:
                        warning = save_checkpoint(checkpoint_dir, {
                            "resume_key": run_key, "identity": run_identity, "step": step, "epoch": next_epoch,
                            "index": next_index,
                            "trainable": trainable_state(model), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "best_val": best_val, "best_step": best_step,
                            "bad_evals": bad_evals, "best_state": best_state, "history": history,
                            "memory": memory_log, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
                            "real_tokens": real_tokens, "label_tokens": label_tokens, "last_train": last_train,
                            "last_val": last_val, "torch_rng": torch.get_rng_state(), "stopped": stopped_early,
                        })
                        if warning:
                            log(warning)
                    if stopped_early:
                        log(f"early stopping: {bad_evals} evaluations without a better validation loss "
                            f"(best {best_val:.4f} at step {best_step})")
                        break
                if stop_after_steps is not None and step - resumed_from >= stop_after_steps:
                    raise KeyboardInterrupt(f"stopped after {stop_after_steps} steps (test hook)")
            if stopped_early:
                break
            epoch += 1
    finally:
        if bar is not None:
            bar.close()
    if best_state is not None:
        load_trainable_state(model, best_state)
    return FitResult(
        final_train_loss=last_train, final_val_loss=last_val, best_val_loss=best_val, best_step=best_step,
        steps=step, epochs_run=round(step / max(1, steps_per_epoch), 3), early_stopped=stopped_early,
        train_seconds=train_seconds, eval_seconds=eval_seconds, real_tokens=real_tokens,
        label_tokens=label_tokens, resumed_from_step=resumed_from, history=history, memory_per_epoch=memory_log,
        epoch_marks=epoch_marks,
    )


def bar_log(bar, log: Callable[[str], None]) -> Callable[[str], None]:
    """`log` for use while `bar` runs: on a terminal each line is written with the bar cleared and
    redrawn after it (tqdm's external_write_mode), so lines do not break it; elsewhere `log` as is."""
    tqdm_bar = getattr(bar, "_bar", None)
    if tqdm_bar is None:
        return log

    def write(message: str) -> None:
        with tqdm_bar.external_write_mode(file=tqdm_bar.fp):
            log(message)

    return write


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _all_reduce_sum(value: float, dist_info: DistInfo) -> float:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=dist_info.device)
    dist.all_reduce(t)
    return float(t[0])


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic and not torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)


def deep_copy_model(model):
    return copy.deepcopy(model)
