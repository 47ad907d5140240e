"""Batched decoding shared by evaluation and the endpoint.

Prompts are left-padded so every row's next token sits in the last column, and `generate` keeps a KV
cache. Decoding stops on the chat format's stop ids (<|eot_id|> or <|end_of_text|> for Llama 3,
<|im_end|> for ChatML); a row that hits max_new_tokens without either
is reported as unfinished (the classic sign of a fine-tune that never learned to stop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .chat import ChatFormat


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]   # generated tokens, without the stop token and padding
    finished: bool         # True when a stop token ended the answer


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def step_hook(on_step: Callable[[int], None]):
    """A stopping criterion that never stops: it calls on_step(n) after the n-th decoding step (one
    new token per row), which is how a progress bar follows one `generate` call."""
    from transformers import StoppingCriteria

    class _Hook(StoppingCriteria):
        def __init__(self):
            self.steps = 0

        def __call__(self, input_ids, scores, **kwargs):
            self.steps += 1
            on_step(self.steps)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return _Hook()


@torch.inference_mode()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, fmt: ChatFormat, temperature: float = 0.0,
                   seed: int | None = None, on_step: Callable[[int], None] | None = None,
                   repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0) -> list[Generation]:
    """Answers for a batch of prompt token ids; greedy (deterministic) when temperature is 0. The
    repetition guard (decoding.repetition_penalty / no_repeat_ngram_size) is off at 1.0 / 0.
    on_step(n), if given, is called after each decoding step n = 1, 2, ... (at most max_new_tokens;
    fewer when every row stopped early): the progress hook. It does not change the answers."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, fmt.pad_id)
    sampling = temperature > 0
    if sampling and seed is not None:
        torch.manual_seed(seed)
    extra = {}
    if on_step is not None:
        from transformers import StoppingCriteriaList

        extra["stopping_criteria"] = StoppingCriteriaList([step_hook(on_step)])
    if repetition_penalty != 1.0:
        extra["repetition_penalty"] = repetition_penalty
    if no_repeat_ngram_size:
        extra["no_repeat_ngram_size"] = no_repeat_ngram_size
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
        do_sample=sampling, temperature=temperature if sampling else None, top_p=None, top_k=None,
        eos_token_id=list(fmt.stop_ids), pad_token_id=fmt.pad_id, use_cache=True, **extra,
    )
    results = []
    for row in out[:, ids.shape[1]:].tolist():
        tokens, finished = [], False
        for token in row:
            if token in fmt.stop_ids:
                finished = True
                break
            tokens.append(token)
        results.append(Generation(tokens, finished))
    return results


# ---------------------------------------------------------------------------------------------------
# How many tokens an answer may take (decoding.max_new_tokens: auto)

BUDGET_QUANTILE = 0.95
BUDGET_MARGIN = 1.25   # room above the p95 reference: an answer a little longer than its reference is fine
BUDGET_FLOOR = 32


@dataclass(frozen=True)
class AnswerBudget:
    max_new_tokens: int
    rule: str             # how it was chosen, for the report and the logs


def reference_tokens(tokenizer, outputs: list[str]) -> list[int]:
    """Each reference answer's length in tokens, with the end-of-turn token the model must emit."""
    return [len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for text in outputs]


def answer_budget(setting, cap: int, lengths: list[int]) -> AnswerBudget:
    """decoding.max_new_tokens: a number is used as is; "auto" is the references' p95 token length
    (nearest rank) x 1.25, rounded up to a multiple of 8, at least 32 and at most `cap`.

    A fixed 64 cut answers whose references run to hundreds of tokens, and every score was then
    computed on truncated text (issue 20); a budget far above the references only costs time when
    an answer loops, which the degenerate-answer flag reports."""
    if setting != "auto":
        return AnswerBudget(int(setting), f"decoding.max_new_tokens {int(setting)}")
    if not lengths:
        return AnswerBudget(min(cap, BUDGET_FLOOR), f"auto: no test references; {min(cap, BUDGET_FLOOR)}")
    ordered = sorted(lengths)
    p95 = ordered[max(0, -(-len(ordered) * 95 // 100) - 1)]
    wanted = -(-int(p95 * BUDGET_MARGIN) // 8) * 8
    value = max(BUDGET_FLOOR, min(cap, wanted))
    capped = " (capped by decoding.max_new_tokens_cap)" if wanted > cap else ""
    return AnswerBudget(value, f"auto: p95 of {len(lengths)} test references is {p95} tokens (longest "
                               f"{ordered[-1]}); x{BUDGET_MARGIN} rounded up to 8 = {wanted}{capped}; using {value}")
