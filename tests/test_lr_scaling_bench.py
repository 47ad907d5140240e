"""bench.lr_scaling: the table of final losses per token budget and learning-rate rule."""

from __future__ import annotations

import argparse

import pytest

from bench import lr_scaling


def test_a_run_is_tokens_and_a_rule_and_anything_else_is_refused_with_the_expected_form():
    assert lr_scaling.parse_run("0") == (0, "sqrt")
    assert lr_scaling.parse_run("2048:linear") == (2048, "linear")
    for bad in ("2048:cubic", "many", "-5:none"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected TOKENS or TOKENS:sqrt|linear|none"):
            lr_scaling.parse_run(bad)


def test_the_table_has_one_row_per_run_with_the_budgeted_step_and_its_scaled_rate(capsys):
    assert lr_scaling.main(["--model", "embedded", "--records", "40", "--threads", "1",
                            "--runs", "0", "256:linear", "256:none"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("embedded, 36 training records (mean ")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("0", "-"), ("256", "linear"), ("256", "none")]
    preset_records, preset_lr = int(rows[0][2]), float(rows[0][4])
    records = int(rows[1][2])
    assert records != preset_records and int(rows[2][2]) == records
    assert float(rows[1][4]) == pytest.approx(preset_lr * records / preset_records, rel=1e-2)  # linear
    assert float(rows[2][4]) == pytest.approx(preset_lr)                                      # none
    assert int(rows[0][3]) == -(-36 // preset_records) and int(rows[1][3]) == -(-36 // records)
    assert rows[0][6].strip() == "+0.0000" and all(r[6].strip()[0] in "+-" for r in rows)
