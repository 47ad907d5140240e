"""The training-length rule (stages/core/schedule.py): epochs from the data, the same in the train
stage, the cost estimate and the dry run."""

from __future__ import annotations

import json

import pytest

from stages.core.schedule import steps_per_epoch, training_length


@pytest.mark.parametrize("records, epochs, steps, line", [
    (10, 40, 1, "10 records, batch 16: 1 step per epoch; training 40 epochs (min_steps 40; train.epochs is 1)"),
    (109, 6, 7, "109 records, batch 16: 7 steps per epoch; training 6 epochs (min_steps 40; train.epochs is 1)"),
    (860, 1, 54, "860 records, batch 16: 54 steps per epoch; training 1 epoch (train.epochs; 54 steps >= min_steps 40)"),
    (10_000, 1, 625, "10000 records, batch 16: 625 steps per epoch; training 1 epoch (train.epochs; 625 steps >= min_steps 40)"),
])
def test_small_data_trains_enough_steps(records, epochs, steps, line):
    length = training_length(records, 16, epochs=1, min_steps=40)
    assert (length.epochs, length.steps_per_epoch) == (epochs, steps)
    assert length.steps >= 40
    assert length.describe() == line


def test_more_epochs_asked_than_the_rule_needs_are_kept_and_zero_turns_it_off():
    assert training_length(109, 16, epochs=9, min_steps=40).epochs == 9
    off = training_length(10, 16, epochs=1, min_steps=0)
    assert off.epochs == 1 and off.describe().endswith("(train.epochs; min_steps off)")


@pytest.mark.parametrize("records, per_step, world", [(10, 16, 1), (109, 16, 1), (33, 8, 2), (17, 8, 2), (16, 8, 4),
                                                      (9, 4, 3), (1, 8, 1)])
def test_steps_per_epoch_is_what_the_training_loop_cuts(records, per_step, world):
    from stages.core.training import epoch_steps

    assert steps_per_epoch(records, per_step, world) == len(epoch_steps(records, per_step, 0, 42, world))


def _train_file(path, n):
    rows = [{"system": "You answer HR questions.", "instruction": f"Question {i}?", "output": f"Answer {i}."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_cost_estimate_and_the_dry_run_take_the_rule(tmp_path, root, capsys):
    from stages import dry_run
    from stages.core.estimate import estimate_training
    from stages.core.params import load_params

    params = load_params(root / "params.yaml")
    per_step = params.train.batch_size * params.train.gradient_accumulation_steps
    expected = training_length(20, per_step, params.train.epochs, params.train.min_steps)
    assert expected.epochs > params.train.epochs  # 20 records are below the default's min_steps
    est = estimate_training(params, train_file=_train_file(tmp_path / "train.jsonl", 20))
    assert est["epochs"] == expected.epochs and est["length_rule"] == expected.describe()

    run = dry_run.DryRun()
    dry_run.check_estimates(run, params, tmp_path, local_tps=100.0, gpu=None)
    reasons = {c.name: c.reason for c in run.checks}
    assert reasons["training length"] == expected.describe()
    assert run.estimates["local"]["minutes"] == round(est["tokens_per_epoch"] * expected.epochs / 100.0 / 60, 2)
