"""The training loop's pieces: batching, the completion-only loss, the schedule.

The loss projects to the 128k-token vocabulary only at positions that have a label, so the LM head,
which dominates a small Llama's step time, does no work on prompt or padding tokens.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .chat import IGNORE_INDEX, PAD_ID, EncodedExample


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def num_real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(examples: list[EncodedExample]) -> Batch:
    """Right-padded batch with the Llama 3 pad token; pads are masked out of attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return Batch(ids, mask, labels)


def batches(examples: list[EncodedExample], batch_size: int, seed: int | None) -> list[list[EncodedExample]]:
    """Micro-batches in a seeded random order (no shuffling when seed is None)."""
    order = list(range(len(examples)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    return [[examples[i] for i in order[start:start + batch_size]] for start in range(0, len(order), batch_size)]


def _body_and_head(model):
    """The transformer body and the LM head of a (peft-wrapped) causal LM."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(inner, "module", inner)  # DDP
    return inner.model, inner.lm_head


def completion_loss_sum(model, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there were."""
    body, head = _body_and_head(model)
    hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][keep]).float()
    loss = F.cross_entropy(logits, targets[keep], reduction="sum")
    return loss, int(keep.sum())


def warmup_cosine(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate_loss(model, examples: list[EncodedExample], batch_size: int, device) -> float:
    """Mean completion-token loss over examples (perplexity is its exp)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in batches(examples, batch_size, seed=None):
        loss, n = completion_loss_sum(model, collate(chunk).to(device))
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(1, count)
