"""The GPU-side training rules (issue 22): token-budget steps and the fused_loss memory rule."""

from __future__ import annotations

import pytest

from stages.core.chat import IGNORE_INDEX, EncodedExample
from stages.core.params import ConfigError, TrainParams
from stages.core.training import (LOGIT_BYTES, epoch_steps, labelled_logits_mb, micro_batches,
                                  most_labelled_positions, records_per_step, select_loss_head, with_token_budget)


def example(n: int) -> EncodedExample:
    return EncodedExample(list(range(1, n + 1)), [IGNORE_INDEX] * (n // 2) + list(range(n - n // 2)))


@pytest.mark.parametrize("lengths, budget, expected", [
    ([100, 100, 100, 100], 250, 2),          # 250 // 100
    ([50, 150, 100, 100], 1000, 4),          # mean 100: 10 records, but only 4 exist
    ([64, 64, 128, 128, 256], 1024, 5),           # mean 128: 8, capped at the 5 records
    ([60, 70, 80, 90] * 100, 16384, 218),    # mean 75: 16384 // 75 = 218
    ([5000, 3000], 1000, 1),                 # a budget smaller than one record: still one record
    ([100, 100], 0, 16),                     # no budget: the default (batch_size x accumulation)
])
def test_records_per_step_from_a_token_budget(lengths, budget, expected):
    assert records_per_step(lengths, budget, 16) == expected


def test_token_budget_sets_the_records_of_every_optimizer_step():
    examples = [example(n) for n in [60, 70, 80, 90] * 100]          # 400 records, mean 75 tokens
    train = TrainParams(tokens_per_step=16384, pack_tokens=4096, packing=True)
    budgeted = with_token_budget(train, examples)
    assert (budgeted.batch_size, budgeted.gradient_accumulation_steps) == (218, 1)
    steps = epoch_steps(len(examples), budgeted.batch_size * budgeted.gradient_accumulation_steps, 0, 42)
    assert [len(s) for s in steps] == [218, 182]
    # without packing: micro-batches of as many records as pack_tokens holds (4096 // 75 = 54), 4 of them
    padded = with_token_budget(train.model_copy(update={"packing": False}), examples)
    assert (padded.batch_size, padded.gradient_accumulation_steps) == (54, 4)
    # tokens_per_step 0 (the CPU default) leaves the step as it was
    assert with_token_budget(TrainParams(), examples) == TrainParams()


def test_token_budget_steps_scale_the_learning_rate_with_the_records_linearly_by_default():
    examples = [example(n) for n in [60, 70, 80, 90] * 100]          # mean 75 tokens
    train = TrainParams(tokens_per_step=16384, pack_tokens=4096, packing=True, learning_rate=1e-4,
                        batch_size=4, gradient_accumulation_steps=4)  # lr set for 16 records per step
    assert train.lr_scaling == "linear"
    budgeted = with_token_budget(train, examples)                     # 218 records per step
    assert budgeted.learning_rate == pytest.approx(1e-4 * 218 / 16)   # 1.3625e-3
    # without packing the step is 54 x 4 = 216 records: the rate follows the records actually taken
    padded = with_token_budget(train.model_copy(update={"packing": False}), examples)
    assert padded.learning_rate == pytest.approx(1e-4 * 216 / 16)
    # a budget smaller than the old step lowers it (4 records: a quarter)
    small = with_token_budget(train.model_copy(update={"tokens_per_step": 300}), examples)
    assert small.learning_rate == pytest.approx(1e-4 * 0.25)
    # sqrt: the square root of the ratio; none keeps the rate as written; anything else is refused
    sqrt = with_token_budget(train.model_copy(update={"lr_scaling": "sqrt"}), examples)
    assert sqrt.learning_rate == pytest.approx(1e-4 * (218 / 16) ** 0.5)   # 3.69e-4
    assert with_token_budget(train.model_copy(update={"lr_scaling": "none"}), examples).learning_rate == 1e-4
    with pytest.raises(ValueError, match="lr_scaling"):
        TrainParams(lr_scaling="cubic")
    # no token budget: nothing is scaled, whatever the rule
    assert with_token_budget(train.model_copy(update={"tokens_per_step": 0}), examples).learning_rate == 1e-4


def shared(own: int, prefix: list[int]) -> EncodedExample:
    """A record of an unlabelled shared prefix and `own` labelled tokens after it."""
    return EncodedExample(prefix + list(range(100, 100 + own)), [IGNORE_INDEX] * (len(prefix) + 1)
                          + list(range(own - 1)), prefix_len=len(prefix))


def test_most_labelled_positions_counts_the_loss_targets_of_the_fullest_micro_batch_of_the_run():
    # 40-token records with 20 targets each (the second half); rows of 100 tokens hold two
    examples = [example(40) for _ in range(12)]
    train = TrainParams(packing=True, pack_tokens=100, batch_size=3, gradient_accumulation_steps=1, epochs=1)
    assert most_labelled_positions(examples, train, shared_prefix=False) == 40
    # one record with more targets: the row that holds it decides, in whichever step the shuffle puts it
    examples[7] = example(90)                                              # 45 targets, a row of its own
    assert most_labelled_positions(examples, train, shared_prefix=False) == 45
    # what fit() builds agrees: the count is each row's targets that are not IGNORE_INDEX
    rows = [row for step in epoch_steps(12, 3, 0, train.seed)
            for row in micro_batches([examples[i] for i in step], 3, True, 100)]
    assert max(int((row.targets != IGNORE_INDEX).sum()) for row in rows) == 45
    # padded micro-batches of batch_size records, split across accumulation steps
    padded = train.model_copy(update={"packing": False, "batch_size": 2, "gradient_accumulation_steps": 3})
    assert most_labelled_positions([example(40)] * 12, padded, shared_prefix=False) == 2 * 20
    # shared-prefix rows: 30 shared tokens + 10 own per record, so 7 records fit a 100-token row (2 without)
    prefix = list(range(1, 31))
    group = [shared(10, prefix) for _ in range(14)]
    steps_of_14 = train.model_copy(update={"batch_size": 14})
    assert most_labelled_positions(group, steps_of_14, shared_prefix=True) == 7 * 9
    assert most_labelled_positions(group, steps_of_14, shared_prefix=False) == 2 * 9
    # 4 processes: each packs its own share of a step, so a row holds at most that share
    ddp = train.model_copy(update={"batch_size": 8})
    assert most_labelled_positions([example(20)] * 16, ddp, shared_prefix=False, world_size=1) == 5 * 10
    assert most_labelled_positions([example(20)] * 16, ddp, shared_prefix=False, world_size=4) == 2 * 10


def test_fused_loss_auto_computes_logits_when_they_fit_the_budget():
    vocab = 128256
    # 1,024 labelled positions x 128,256 x 12 bytes = 1,503 MiB (the H200 measured 1,535)
    assert labelled_logits_mb(1024, vocab) == pytest.approx(1024 * vocab * LOGIT_BYTES / 2 ** 20)
    fits = select_loss_head("auto", cuda=True, liger_installed=True, labelled_positions=1024, vocab_size=vocab,
                            budget_mb=1504)
    assert fits.value == "completion" and "1,503 MiB <= fused_loss_budget_mb 1,504" in fits.note
    over = select_loss_head("auto", cuda=True, liger_installed=True, labelled_positions=1024, vocab_size=vocab,
                            budget_mb=1502)
    assert over.value == "liger" and "1,503 MiB > fused_loss_budget_mb 1,502" in over.note
    assert select_loss_head("auto", cuda=True, liger_installed=True, labelled_positions=0, vocab_size=vocab,
                            budget_mb=0).value == "completion"
    # explicit choices and machines without liger are not affected by the budget
    assert select_loss_head("liger", cuda=True, liger_installed=True, labelled_positions=1, vocab_size=vocab,
                            budget_mb=10 ** 6).value == "liger"
    assert select_loss_head("none", cuda=True, liger_installed=True, labelled_positions=10 ** 6, vocab_size=vocab,
                            budget_mb=0).value == "completion"
    assert select_loss_head("auto", cuda=False, liger_installed=True, labelled_positions=10 ** 6, vocab_size=vocab,
                            budget_mb=0).value == "completion"
    with pytest.raises(ConfigError):
        select_loss_head("liger", cuda=True, liger_installed=False, labelled_positions=1, vocab_size=vocab, budget_mb=1)
    # without sizes, auto cannot judge memory and keeps liger on CUDA (the earlier behaviour)
    assert select_loss_head("auto", cuda=True, liger_installed=True).value == "liger"
