"""Batched decoding shared by evaluation and the endpoint.

Prompts are left-padded so every row's next token sits in the last column, and `generate` keeps a KV
cache. Decoding stops on <|eot_id|> or <|end_of_text|>; a row that hits max_new_tokens without either
is reported as unfinished (the classic sign of a fine-tune that never learned to stop).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .chat import PAD_ID, STOP_IDS


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]   # generated tokens, without the stop token and padding
    finished: bool         # True when a stop token ended the answer


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


@torch.inference_mode()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                   seed: int | None = None) -> list[Generation]:
    """Answers for a batch of prompt token ids; greedy (deterministic) when temperature is 0."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts)
    sampling = temperature > 0
    if sampling and seed is not None:
        torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
        do_sample=sampling, temperature=temperature if sampling else None, top_p=None, top_k=None,
        eos_token_id=list(STOP_IDS), pad_token_id=PAD_ID, use_cache=True,
    )
    results = []
    for row in out[:, ids.shape[1]:].tolist():
        tokens, finished = [], False
        for token in row:
            if token in STOP_IDS:
                finished = True
                break
            tokens.append(token)
        results.append(Generation(tokens, finished))
    return results
