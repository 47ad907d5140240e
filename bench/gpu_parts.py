"""The parts of the GPU benchmark kit (bench/gpu.py). Each runs in its own child process.

A part takes the run's context (a plain dict: mode, sizes, the measured matmul peak, earlier
results) and returns {"status": "ok", "rows": [...], ...}. It raises Skip("why") when it cannot run
here (no CUDA, a package absent); any other exception becomes "failed: <one line>" in the parent.
Rows share the kit's one table (bench.gpu.COLUMNS); a value a part does not measure is left out.

Every part calls the project's own code: stages.core.training (fit, the loss heads), the train
stage's model construction (stages.train.build_model_hf, for QLoRA), bench.train_bench (ours vs
the Trainer + PEFT baseline) and serve.engine.Engine (the endpoint's batcher).
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data/raw/corporate_qa.jsonl"


class Skip(Exception):
    """The part cannot run here; the message says why (it becomes "skipped: <message>")."""


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------

def device_of(ctx):
    import torch

    if ctx["smoke"]:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise Skip("no CUDA GPU visible to torch")
    return torch.device("cuda")


def kit_params(epochs: int, **train_overrides):
    """The kit's base settings: params.yaml with the embedded preset applied and the benchmark's fixed
    schedule (bench.train_bench.bench_params). Every part encodes with the Llama 3 tokenizer, which the
    embedded model (the smoke) and the Llama-3.2 architectures (the GPU) share; params.yaml's own
    default (SmolLM2, a 49,152-token vocabulary) cannot take its ids."""
    from bench.train_bench import bench_params, with_preset

    return with_preset(bench_params(epochs, **train_overrides), "embedded", epochs)


def model_name(ctx, size: str) -> str:
    """The model a part runs: the exact Llama-3.2 architecture on a GPU, the embedded default in the smoke."""
    return "embedded" if ctx["smoke"] else size


def release(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def keep(ctx, rows: list[dict]) -> None:
    """The rows measured so far, written (atomically) where the kit reads them if it must stop this
    part at its share of the budget (bench.gpu.run_part): a part stopped mid-way still brings back the
    runs it finished. Without a progress path (a part called by hand) it does nothing."""
    import json
    import os

    path = ctx.get("progress_path")
    if not path:
        return
    partial = f"{path}.partial"
    Path(partial).write_text(json.dumps({"rows": rows}, default=str), encoding="utf-8")
    os.replace(partial, path)


def workload(ctx, tokenizer):
    """(params, train examples, val examples) of the fixed slice the training parts share.

    On a GPU the random-weight Llama-3.2 architectures train with the `llama-3.2-1b` preset's
    settings (learning rate 1e-4, warm-up 0.1, LoRA r 32 / alpha 64): the embedded model's 5e-3
    (params.yaml) diverged on 1B (`training loss is nan at step 88`)."""
    from bench.train_bench import encode_rows, load_records, with_preset

    overrides = {"pack_tokens": ctx["pack_tokens"]} if ctx.get("pack_tokens") else {}
    params = kit_params(ctx["epochs"], **overrides)
    if not ctx["smoke"]:
        params = with_preset(params, "llama-3.2-1b", ctx["epochs"])
        params = params.model_copy(update={"train": params.train.model_copy(update=overrides)})
    train_rows, val_rows = load_records(DATA, ctx["records"])
    if ctx["smoke"]:
        val_rows = val_rows[:4]
    return params, encode_rows(tokenizer, train_rows), encode_rows(tokenizer, val_rows)


def budgeted(params, train_ex, tokens_per_step: int, epochs: int, vocab_size: int, liger: bool, cuda: bool):
    """params for "ours" with steps of `tokens_per_step` tokens (stages.core.training.with_token_budget)
    and the loss head that fused_loss auto picks for them (pinned_head). Returns (params, head choice)."""
    from stages.core.training import with_token_budget

    train = params.train.model_copy(update={"tokens_per_step": tokens_per_step, "epochs": epochs})
    return pinned_head(params.model_copy(update={"train": with_token_budget(train, train_ex)}), train_ex,
                       vocab_size, liger, cuda)


def pinned_head(params, train_ex, vocab_size: int, liger: bool, cuda: bool):
    """params with the loss head that fused_loss auto picks in the train stage (stages/train.py: the
    memory rule on the most labelled positions of any micro-batch of the run) pinned as fused_loss
    liger/none, so the train loop takes it as is. Returns (params, head choice)."""
    from stages.core.training import most_labelled_positions, select_loss_head, uses_shared_prefix

    train = params.train
    labelled = most_labelled_positions(train_ex, train, uses_shared_prefix(train))
    choice = select_loss_head("auto", cuda, liger, labelled_positions=labelled,
                              vocab_size=vocab_size, budget_mb=train.fused_loss_budget_mb)
    train = train.model_copy(update={"fused_loss": "liger" if choice.value == "liger" else "none"})
    return params.model_copy(update={"train": train}), choice


def materialise(ctx, size: str, tokenizer, device) -> Path:
    """A saved model folder (config, bf16 random weights, tokenizer) for the loaders that need a path:
    the 4-bit loader (QLoRA) and the endpoint's Engine. Written once per run, renamed into place."""
    import torch
    from transformers import LlamaForCausalLM

    from bench.train_bench import GPU_MODELS
    from stages.core.chat import chat_format
    from stages.core.estimate import model_config
    from stages.core.modeling import load_base_model

    name = model_name(ctx, size)
    path = Path(ctx["work_dir"]) / f"model-{name}"
    if (path / "config.json").is_file():
        return path
    params = kit_params(ctx["epochs"])
    if name == "embedded":
        model = load_base_model(params.model, dtype=torch.float32, device="cpu", tokenizer=tokenizer)
    else:
        config = model_config(params.model.model_copy(update={"base": GPU_MODELS[name]}))
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        fmt = chat_format(tokenizer)
        model.generation_config.pad_token_id = fmt.pad_id
        model.generation_config.eos_token_id = list(fmt.stop_ids)
    staging = path.with_name(path.name + ".partial")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(path)
    del model
    release(device)
    return path


def _time_it(fn, device, repeats: int, warmup: int) -> float:
    """Median seconds of fn() (device events on CUDA, perf_counter on CPU), after warm-up calls."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------------

def part_matmul(ctx) -> dict:
    """The GPU's bf16 matrix-product rate on random data, measured now: the MFU denominator."""
    import torch

    device = device_of(ctx)
    n, dtype = (256, torch.float32) if device.type == "cpu" else (8192, torch.bfloat16)
    # Two input sets, alternated, so repeats do not run out of the L2 cache; never zeros
    # (they multiply faster than real data).
    pairs = [(torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype))
             for _ in range(2)]
    state = {"i": 0}

    def product():
        a, b = pairs[state["i"] % 2]
        state["i"] += 1
        return a @ b

    seconds = _time_it(product, device, repeats=20, warmup=5)
    flops = 2 * n ** 3 / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    what = f"{str(dtype).replace('torch.', '')} {n}x{n}x{n}"
    return {"status": "ok", "peak_flops": flops, "device_name": name,
            "rows": [{"part": "matmul", "model": "-", "run": what,
                      "setting": f"{flops / 1e12:.1f} TFLOP/s (median of 20, random inputs)",
                      "tflops": round(flops / 1e12, 2)}]}


def _train_row(name: str, run: str, r: dict, extra: str = "") -> dict:
    return {"part": "train", "model": name, "run": run, "setting": r["setting"] + extra,
            "tokens_per_s": r["tokens_per_s"], "mfu": r.get("mfu"), "peak_mb": r["peak_mb"],
            "final_loss": r["final_val_loss"], "train_s": r["train_s"], "real_tokens": r["real_tokens"],
            "records": r["records"], "epochs": r["epochs"], "warmup_s": r.get("warmup_s"),
            **({"steady": r["steady"]} if r.get("steady") else {})}


def part_train(ctx, size: str, baseline: bool = True) -> dict:
    """This project's train loop vs the plain Trainer + PEFT baseline.

    Runs (each on a fresh model, after the same warm-up: one full step at learning rate 0):
      ours          token-budget steps (train.tokens_per_step), the head fused_loss auto picks,
                    `epochs` epochs: the steady-state figure;
      ours-records  today's steps of 16 records (4 x accumulation 4), 1 epoch: the before figure;
      ours-1ep      as ours, `baseline_epochs` epochs: the final loss on the baseline's tokens;
      baseline      Trainer + PEFT, `baseline_epochs` epochs;
      ours, varlen attention   as ours, `sweep_epochs` epochs, with train.attention varlen (stages/core/attention.py):
                    each packed record attends to itself, no mask (PyTorch's variable-length
                    flash attention on CUDA), against the dense masked row below;
      ours, rows of N   as ours, `sweep_epochs` epochs, with packed rows of N tokens, for each N of `pack_sweep`: SDPA
                    computes a packed row's block-diagonal mask densely, so attention costs the
                    square of the row's length whatever its records' lengths (pack_sweep_summary).
    Then steps under torch.profiler (profile_steps), `profile_steps` of ours-records (where a step of
    the preset's size goes, which the last H200 run put at ~270 ms for ~1,100 tokens) and
    `profile_budget_steps` of ours (where a token-budget step goes: the 12.4% MFU of the last H200
    run, and whether the masked attention of the packed rows takes the half of it that
    docs/training.md's "Choosing pack_tokens" computes).
    """
    from bench.train_bench import measure_variant
    from stages.core.estimate import model_config
    from stages.core.modeling import load_tokenizer, resolve_dtype
    from stages.core.training import package_available

    from bench.train_bench import GPU_MODELS

    device = device_of(ctx)
    name = model_name(ctx, size)
    tokenizer = load_tokenizer("embedded")
    params, train_ex, val_ex = workload(ctx, tokenizer)
    dtype = resolve_dtype(params.train.precision, device)
    base = params.model if name == "embedded" else params.model.model_copy(update={"base": GPU_MODELS[name]})
    vocab = model_config(base).vocab_size
    liger = device.type == "cuda" and package_available("liger_kernel")
    ours, head = budgeted(params, train_ex, ctx["tokens_per_step"], ctx["epochs"], vocab, liger, device.type == "cuda")
    per_step = ours.train.batch_size * ours.train.gradient_accumulation_steps
    budget_note = (f"; {ctx['tokens_per_step']} tokens/step = {per_step} records/step, lr {ours.train.learning_rate:.3g} "
                   f"({ours.train.lr_scaling} of {params.train.learning_rate:.3g}); {head.note or head.value}")
    runs = [("ours", ours, budget_note)]
    if baseline:
        records = params.model_copy(update={"train": params.train.model_copy(update={"epochs": ctx["baseline_epochs"]})})
        ours_records, records_head = pinned_head(records, train_ex, vocab, liger, device.type == "cuda")
        ours_short, _ = budgeted(params, train_ex, ctx["tokens_per_step"], ctx["baseline_epochs"], vocab, liger,
                                 device.type == "cuda")
        runs += [("ours-records", ours_records, "; 16 records/step (before token budgets); "
                                                + (records_head.note or records_head.value)),
                 ("ours-1ep", ours_short, budget_note), ("baseline", records, "")]
    if baseline:  # train_1b only (3B's budget is its ours): the same steps, attention record by record
        unmasked = params.model_copy(update={"train": params.train.model_copy(update={"attention": "varlen"})})
        varlen, varlen_head = budgeted(unmasked, train_ex, ctx["tokens_per_step"], ctx["sweep_epochs"], vocab, liger,
                                       device.type == "cuda")
        runs.append(("ours, varlen attention", varlen, f"; attention varlen through {_varlen_path(device, dtype)} "
                     "(records attend record by record, no mask); " + (varlen_head.note or varlen_head.value)))
    for rows_of in ctx.get("pack_sweep", []) if baseline else []:  # train_1b only: 3B's budget is its ours
        resized = params.model_copy(update={"train": params.train.model_copy(update={"pack_tokens": rows_of})})
        swept, swept_head = budgeted(resized, train_ex, ctx["tokens_per_step"], ctx["sweep_epochs"], vocab, liger,
                                     device.type == "cuda")
        runs.append((f"ours, rows of {rows_of:,}", swept, f"; rows of {rows_of:,} tokens; "
                     + (swept_head.note or swept_head.value)))
    rows, results = [], {}
    for run, run_params, note in runs:
        release(device)
        variant = "baseline" if run == "baseline" else "ours"
        steps = run_params.train.batch_size * run_params.train.gradient_accumulation_steps
        try:
            r = measure_variant(variant, name, run_params, tokenizer, train_ex, val_ex, device, dtype,
                                warmup_records=max(ctx["warmup_records"], steps) if variant == "ours"
                                else ctx["warmup_records"], peak_flops=ctx.get("peak_flops"))
        except Exception as exc:  # noqa: BLE001 - one run failing leaves the others' figures
            rows.append({"part": "train", "model": name, "run": run, "status": f"failed: {one_line(exc)}"})
            keep(ctx, rows)
            continue
        results[run] = r
        rows.append(_train_row(name, run, r, note))
        keep(ctx, rows)
    out = {"status": "ok", "rows": rows, "model": name}
    params_of = {run: run_params for run, run_params, _ in runs}
    profiled = [("ours-records", ctx.get("profile_steps")), ("ours", ctx.get("profile_budget_steps"))]
    for run, steps in profiled if baseline else []:  # train_1b only
        if run not in results or not steps:
            continue
        release(device)
        try:
            profile = profile_steps(name, params_of[run], tokenizer, train_ex, device, dtype, steps)
        except Exception as exc:  # noqa: BLE001 - the figures above stand without it
            profile = {"status": f"failed: {one_line(exc)}"}
        out.setdefault("profiles", {})[run] = profile
    if "ours" in results and "ours, varlen attention" in results:
        out["varlen"] = varlen_summary(results["ours"], results["ours, varlen attention"])
    if ctx.get("pack_sweep") and "ours" in results:
        out["pack_sweep"] = pack_sweep_summary(results, params.train.pack_tokens, ctx["pack_sweep"])
    if "ours" in results and "baseline" in results:
        out["speedup"] = round(results["ours"]["tokens_per_s"] / results["baseline"]["tokens_per_s"], 3)
    if "ours" in results and "ours-records" in results:
        out["token_budget_speedup"] = round(results["ours"]["tokens_per_s"] / results["ours-records"]["tokens_per_s"], 3)
    if "ours-1ep" in results and "baseline" in results:
        out["loss_same_tokens"] = {"ours": results["ours-1ep"]["final_val_loss"],
                                   "baseline": results["baseline"]["final_val_loss"]}
        if "ours-records" in results:  # the same optimizer steps as the baseline: the loss side of the trade
            out["loss_same_tokens"]["ours_records"] = results["ours-records"]["final_val_loss"]
    if not results:
        out["status"] = "failed: " + "; ".join(row["status"][len("failed: "):] for row in rows)
    return out


def _varlen_path(device, dtype) -> str:
    """Which implementation of attention varlen a run takes here (stages.core.attention.implementation)."""
    from stages.core import attention

    if attention.implementation(device, dtype) == "kernel":
        return "torch.nn.attention.varlen (the flash kernel)"
    return "per-record SDPA (no varlen kernel here)"


def steady_rate(r: dict) -> float:
    """Steady-state real tokens/s (the epochs after the first) where a run has one, else the whole run's."""
    return (r.get("steady") or {}).get("tokens_per_s") or r["tokens_per_s"]


def varlen_summary(ours: dict, varlen: dict) -> dict:
    """attention varlen against ours' sdpa on the same steps: throughput ratio, both final losses
    (the same maths: they differ by the kernels' rounding only)."""
    return {"measure": "steady" if ours.get("steady") and varlen.get("steady") else "all epochs",
            "tokens_per_s": [round(steady_rate(varlen), 1), round(steady_rate(ours), 1)],
            "over_ours": round(steady_rate(varlen) / steady_rate(ours), 3),
            "final_loss": [varlen["final_val_loss"], ours["final_val_loss"]],
            "peak_mb": [varlen["peak_mb"], ours["peak_mb"]]}


def pack_sweep_summary(results: dict, ours_rows: int, sweep: list[int]) -> dict:
    """Real tokens/s of ours by packed-row length: steady state (the epochs after the first) where a
    run has one, else the whole run; each length's ratio to ours' rows."""
    measure = "steady" if results["ours"].get("steady") else "all epochs"
    rates = {ours_rows: steady_rate(results["ours"])}
    for rows_of in sweep:
        run = results.get(f"ours, rows of {rows_of:,}")
        if run is not None:
            rates[rows_of] = steady_rate(run)
    return {"ours_rows": ours_rows, "measure": measure,
            "tokens_per_s": {str(k): round(v, 1) for k, v in sorted(rates.items())},
            "over_ours": {str(k): round(v / rates[ours_rows], 3) for k, v in sorted(rates.items()) if k != ours_rows}}


def profile_steps(name: str, params, tokenizer, train_ex, device, dtype, steps: int) -> dict:
    """Where an optimizer step's time goes: `steps` steps of this project's train loop (fit) under
    torch.profiler, after one unprofiled step, at learning rate 0 on a fresh model (the weights never
    move). Returns the wall milliseconds a step, the milliseconds in device kernels (CUDA) a step, the
    kernel launches a step, and the operators with the most self time (device time on CUDA, CPU time
    elsewhere). A step far longer than its kernels is bound by the host: Python, launches, syncs."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.train_bench import build
    from stages.core.chat import chat_format
    from stages.core.training import fit, package_available, select_loss_head

    cuda = device.type == "cuda"
    train = params.train.model_copy(update={"epochs": 1, "learning_rate": 0.0, "evals_per_epoch": 1})
    per_step = train.batch_size * train.gradient_accumulation_steps
    # records enough for the warm-up step and the profiled ones (repeated if the slice is small: at
    # learning rate 0 a repeated record costs what a new one does)
    examples = (train_ex * (per_step * (steps + 1) // max(1, len(train_ex)) + 1))[:per_step * (steps + 1)]
    model = build(name, params, device, dtype)
    head = select_loss_head(train.fused_loss, cuda, package_available("liger_kernel")).value
    pad_id = chat_format(tokenizer).pad_id

    def run(examples):
        fit(model, examples, [], train, device=device, head_mode=head, log=lambda _m: None, pad_id=pad_id)
        if cuda:
            torch.cuda.synchronize(device)

    tokens = sum(len(example.input_ids) for example in examples[per_step:])  # real tokens, before packing
    run(examples[:per_step])  # allocations and kernel selection before the profiled steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        began = time.perf_counter()
        run(examples[per_step:])
        wall = time.perf_counter() - began
    summary = profile_summary(prof.key_averages(), steps, wall, cuda, top=8)
    del model
    return {**summary, "records_per_step": per_step, "tokens_per_step": round(tokens / steps), "head": head}


def part_compile(ctx) -> dict:
    """train.compile on against off: train_1b's `ours` run with the model body compiled (torch.compile,
    dynamic shapes), `compile_epochs` epochs after the same untimed warm-up, which here includes the
    compilation. Compared with train_1b's `ours` row of the same kit run on steady-state real tokens/s
    (the epochs after the first, both runs the first timed run of their process) and on the warm-up's
    seconds (what compiling costs once)."""
    from bench.train_bench import GPU_MODELS, measure_variant
    from stages.core.estimate import model_config
    from stages.core.modeling import load_tokenizer, resolve_dtype
    from stages.core.params import ConfigError
    from stages.core.training import package_available, select_compile

    device = device_of(ctx)
    try:
        select_compile("on", "hf", "none", device.type == "cuda")
    except ConfigError as exc:
        raise Skip(str(exc)) from None
    name = model_name(ctx, "1b")
    tokenizer = load_tokenizer("embedded")
    params, train_ex, val_ex = workload(ctx, tokenizer)
    dtype = resolve_dtype(params.train.precision, device)
    base = params.model if name == "embedded" else params.model.model_copy(update={"base": GPU_MODELS[name]})
    liger = device.type == "cuda" and package_available("liger_kernel")
    ours, head = budgeted(params, train_ex, ctx["tokens_per_step"], ctx["compile_epochs"],
                          model_config(base).vocab_size, liger, device.type == "cuda")
    ours = ours.model_copy(update={"train": ours.train.model_copy(update={"compile": "on"})})
    steps = ours.train.batch_size * ours.train.gradient_accumulation_steps
    release(device)
    r = measure_variant("ours", name, ours, tokenizer, train_ex, val_ex, device, dtype,
                        warmup_records=max(ctx["warmup_records"], steps), peak_flops=ctx.get("peak_flops"))
    note = (f"; as ours, train.compile on, {ctx['compile_epochs']} epochs; warm-up with compilation "
            f"{r['warmup_s']:.0f} s; {head.note or head.value}")
    out = {"status": "ok", "rows": [_train_row(name, "ours-compiled", r, note)], "model": name}
    eager = next((row for row in ctx.get("train_rows", []) if row.get("run") == "ours" and "tokens_per_s" in row), None)
    if eager:
        ratio = {"overall": round(r["tokens_per_s"] / eager["tokens_per_s"], 3),
                 "warmup_s": {"compiled": r["warmup_s"], "eager": eager.get("warmup_s")},
                 "final_loss": {"compiled": r["final_val_loss"], "eager": eager.get("final_loss")}}
        steady, eager_steady = r.get("steady"), eager.get("steady")
        if steady and eager_steady:
            ratio["steady"] = round(steady["tokens_per_s"] / eager_steady["tokens_per_s"], 3)
            ratio["steady_tokens_per_s"] = {"compiled": steady["tokens_per_s"], "eager": eager_steady["tokens_per_s"]}
        out["compiled_over_eager"] = ratio
    return out


def part_loss_head(ctx) -> dict:
    """The loss head alone, forward + backward, on one micro-batch of hidden states: liger's fused
    linear cross-entropy vs logits at labelled positions vs logits everywhere (the baseline's way).
    Calls stages.core.training.completion_loss_sum, the function the train loop uses."""
    import torch

    from stages.core.chat import IGNORE_INDEX
    from stages.core.estimate import model_config
    from stages.core.modeling import load_tokenizer
    from stages.core.training import Batch, completion_loss_sum, package_available

    from bench.train_bench import GPU_MODELS

    device = device_of(ctx)
    name = model_name(ctx, "1b")
    params = kit_params(ctx["epochs"])
    base = params.model if name == "embedded" else params.model.model_copy(update={"base": GPU_MODELS[name]})
    config = model_config(base)
    hidden_size, vocab = config.hidden_size, config.vocab_size
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tokens = 64 if ctx["smoke"] else ctx["loss_head_tokens"]
    # The real share of labelled (completion) positions in the workload, at random positions.
    _, train_ex, _ = workload(ctx, load_tokenizer("embedded"))
    share = sum(e.num_completion_tokens for e in train_ex) / sum(len(e.input_ids) for e in train_ex)
    generator = torch.Generator().manual_seed(0)
    labelled = torch.rand(1, tokens, generator=generator) < share
    targets = torch.where(labelled, torch.randint(0, vocab, (1, tokens), generator=generator),
                          torch.full((1, tokens), IGNORE_INDEX))
    batch = Batch(torch.zeros(1, tokens, dtype=torch.long), None, targets.clone(),
                  torch.arange(tokens).unsqueeze(0), targets).to(device)

    class Body(torch.nn.Module):  # stands in for the transformer: returns fixed hidden states
        def __init__(self):
            super().__init__()
            self.hidden = torch.nn.Parameter(torch.randn(1, tokens, hidden_size, dtype=dtype, device=device))

        def forward(self, **_):
            return type("Out", (), {"last_hidden_state": self.hidden})()

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Body()
            self.lm_head = torch.nn.Linear(hidden_size, vocab, bias=False, device=device, dtype=dtype)
            self.lm_head.weight.requires_grad_(False)  # frozen under LoRA (tied to the embedding)
            with torch.no_grad():
                self.lm_head.weight.normal_(0, 0.02)

    stub = Stub()
    liger_ok = device.type == "cuda" and package_available("liger_kernel")
    rows = []
    for mode, label in (("liger", "liger fused linear CE"), ("completion", "logits at labelled positions"),
                        ("full", "logits everywhere (baseline)")):
        row = {"part": "loss_head", "model": name, "run": mode,
               "setting": f"{label}; {tokens} tokens, {share:.0%} labelled, vocab {vocab}"}
        if mode == "liger" and not liger_ok:
            why = "liger-kernel needs CUDA (Triton kernels)" if device.type != "cuda" else "liger-kernel is not installed"
            rows.append({**row, "status": f"skipped: {why}"})
            continue
        release(device)
        try:
            def step():
                stub.model.hidden.grad = None
                loss, count = completion_loss_sum(stub, batch, mode)
                (loss / max(1, count)).backward()
                return loss

            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            step()  # first call: compilation and allocation, outside the peak and the timing
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            seconds = _time_it(step, device, repeats=3 if ctx["smoke"] else 10, warmup=1)
            loss, count = completion_loss_sum(stub, batch, mode)
            row.update(tokens_per_s=round(tokens / seconds, 1), final_loss=round(float(loss.detach()) / max(1, count), 4))
            if device.type == "cuda":
                row["peak_mb"] = round((torch.cuda.max_memory_allocated(device) - before) / 2 ** 20, 1)
        except Exception as exc:  # noqa: BLE001
            row["status"] = f"failed: {one_line(exc)}"
        rows.append(row)
    from stages.core.training import labelled_logits_mb, select_loss_head

    labelled = int(labelled.sum())
    pick = select_loss_head("auto", device.type == "cuda", liger_ok, labelled_positions=labelled, vocab_size=vocab,
                            budget_mb=params.train.fused_loss_budget_mb)
    return {"status": "ok", "rows": rows, "peak_note": "peak_mb: memory the head adds over its inputs",
            "auto_rule": {"labelled_positions": labelled, "estimated_mb": round(labelled_logits_mb(labelled, vocab), 1),
                          "budget_mb": params.train.fused_loss_budget_mb, "pick": pick.value, "note": pick.note}}


def part_qlora(ctx) -> dict:
    """QLoRA (bitsandbytes nf4 base) against bf16 LoRA, both built by the train stage's own model
    construction (stages.train.build_model_hf) from the same saved 1B folder, with the same slice,
    settings (token-budget steps, the same loss head) and warm-up (one full step at learning rate 0
    on each fresh model). Order A B B A (lora, qlora, qlora, lora), so neither arm always runs first
    or last; each arm's two runs give its spread. Without CUDA or bitsandbytes the QLoRA runs are
    skipped and the LoRA arm still runs (the smoke covers its code)."""
    import statistics as stats

    import torch

    from bench.train_bench import measure_variant
    from stages.core.modeling import load_tokenizer, resolve_dtype
    from stages.core.params import ConfigError
    from stages.core.training import check_method, package_available
    from stages.train import build_model_hf  # imported before the check, so the smoke proves it imports

    try:
        check_method("qlora", torch.cuda.is_available() and not ctx["smoke"], package_available("bitsandbytes"))
        qlora_why = None
    except ConfigError as exc:
        qlora_why = str(exc)

    device = device_of(ctx)
    name = model_name(ctx, "1b")
    tokenizer = load_tokenizer("embedded")
    params, train_ex, val_ex = workload(ctx, tokenizer)
    folder = materialise(ctx, "1b", tokenizer, device)
    from stages.core.estimate import model_config

    vocab = model_config(params.model.model_copy(update={"base": str(folder)})).vocab_size
    liger = device.type == "cuda" and package_available("liger_kernel")
    params, head = budgeted(params, train_ex, ctx["tokens_per_step"], ctx["qlora_epochs"], vocab, liger,
                            device.type == "cuda")
    dtype = resolve_dtype(params.train.precision, device)
    rows, figures = [], {"lora": [], "qlora": []}
    order = ("lora", "qlora", "qlora", "lora")
    for position, arm in enumerate(order):
        row = {"part": "qlora", "model": name, "run": f"{arm} #{order[:position + 1].count(arm)} (run {position + 1} of 4)"}
        if arm == "qlora" and qlora_why:
            rows.append({**row, "status": f"skipped: {qlora_why}"})
            continue
        arm_params = params.model_copy(update={
            "model": params.model.model_copy(update={"base": str(folder)}),
            "train": params.train.model_copy(update={"method": arm})})
        release(device)
        try:
            model = build_model_hf(arm_params, device, dtype, tokenizer=tokenizer)
            steps = arm_params.train.batch_size * arm_params.train.gradient_accumulation_steps
            r = measure_variant("ours", name, arm_params, tokenizer, train_ex, val_ex,
                                device, dtype, warmup_records=max(ctx["warmup_records"], steps),
                                peak_flops=ctx.get("peak_flops"), model=model)
        except Exception as exc:  # noqa: BLE001
            rows.append({**row, "status": f"failed: {one_line(exc)}"})
            continue
        finally:
            model = None
        figures[arm].append(r["tokens_per_s"])
        q = arm_params.train.quantization
        what = f"nf4 (double quant {q.double_quant}) base, " if arm == "qlora" else ""
        rows.append({**row, "setting": f"{what}{r['setting']}; {head.note or head.value}",
                     "tokens_per_s": r["tokens_per_s"], "mfu": r.get("mfu"), "peak_mb": r["peak_mb"],
                     "final_loss": r["final_val_loss"], "train_s": r["train_s"], "real_tokens": r["real_tokens"]})
        keep(ctx, rows)
    out = {"status": "ok", "rows": rows, "order": "lora, qlora, qlora, lora",
           "tokens_per_s": {arm: values for arm, values in figures.items()}}
    if figures["lora"] and figures["qlora"]:
        lora, qlora = stats.mean(figures["lora"]), stats.mean(figures["qlora"])
        spread = lambda v: (max(v) - min(v)) / stats.mean(v) if len(v) > 1 else 0.0  # noqa: E731
        out["vs_bf16_lora"] = {"tokens_per_s_ratio": round(qlora / lora, 3),
                               "lora_spread": round(spread(figures["lora"]), 3),
                               "qlora_spread": round(spread(figures["qlora"]), 3),
                               "peak_mb_ratio": round(
                                   max(r.get("peak_mb", 0) for r in rows if r["run"].startswith("qlora") and "peak_mb" in r)
                                   / max(r.get("peak_mb", 1) for r in rows if r["run"].startswith("lora") and "peak_mb" in r), 3)}
    if not figures["lora"] and not figures["qlora"]:
        out["status"] = "failed: " + "; ".join(r["status"] for r in rows if "status" in r)
    return out


class StepTimer:
    """Times the continuous engine's decoding steps from inside its loop: wraps the manager's
    `_generation_step` (the model's forward and sampling for one batch) and counts the seconds spent
    in it. On CUDA it synchronises at the end of each step, so the device's work is counted there and
    not in whatever reads the tokens next. The loop reads them right after each step when batching
    is synchronous, so this changes no total time. With asynchronous batching (transformers turns it
    on only where no attention mask is needed) it would remove the overlap: such steps are neither
    synchronised nor reported.

    A level's wall time / steps minus the time in the step is what the loop spends outside the model:
    scheduling, batch preparation, result bookkeeping, and idle time between requests. Issue 22 asked
    for exactly this split, to tell host-side overhead from GPU work."""

    def __init__(self, manager, device):
        self.seconds, self.calls, self.asynchronous = 0.0, 0, False
        self._manager = None
        if not hasattr(manager, "_generation_step"):
            return  # nothing timed: no calls, so the levels report no split
        import torch

        inner = manager._generation_step
        cuda = device.type == "cuda"

        def timed(*args, **kwargs):
            if getattr(getattr(manager, "batch_processor", None), "use_async_batching", False):
                self.asynchronous = True
                return inner(*args, **kwargs)
            began = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                if cuda:
                    torch.cuda.synchronize(device)
                self.seconds += time.perf_counter() - began
                self.calls += 1

        manager._generation_step = timed  # an instance attribute, over the class's method
        self._manager = manager

    def snapshot(self) -> tuple[float, int]:
        return self.seconds, self.calls

    def remove(self) -> None:
        """Unwraps the step. Before a DecodeProfiler runs on the same engine: this timer's
        synchronisation at the end of each step would move the device's work into the "forward launch"
        phase and add a synchronisation a step to the profile."""
        if self._manager is not None:
            del self._manager._generation_step
            self._manager = None


# The phases of one pass of transformers' decoding loop (ContinuousBatchingManager._generation_loop_body,
# 5.17 and 5.24), in order: (label, owner, method). The owner is the manager's batch processor, its
# inputs_and_outputs or its model_runner.
LOOP_PHASES = (
    ("scheduling and batch tensors", "batch", "prepare_next_batch"),
    ("model inputs", "io", "get_model_kwargs"),
    ("forward launch", "runner", "compute_batch"),
    ("waiting for outputs", "io", "retrieve_device_outputs"),
    ("update", "batch", "update_batch"),
)


class DecodeProfiler:
    """Where a continuous engine's decoding step goes, measured from inside its decoding thread.

    After `skip` steps (the prefill of the requests that follow), two windows of `steps` steps each:
    1. host timers around each phase of the loop (LOOP_PHASES). In a synchronous loop (SDPA, no
       flash attention) "forward launch" is the host's time to launch the forward or replay its CUDA
       graph, and "waiting for outputs" is the copy of the sampled tokens to the host, which waits
       for the device to finish the step: device-bound steps show up there, host-bound ones in the
       other phases. On a CPU the forward itself is in "forward launch".
    2. torch.profiler: the decoding thread's operators (the profiler records the CPU side only in
       the thread that starts it, so it starts and stops inside the loop) and, on CUDA, every
       kernel, whichever stream or graph ran it.
    The windows never overlap: the profiler's bookkeeping slows the host phases the timers measure.
    A window closes early when the batch empties. Use as a context manager around the requests."""

    def __init__(self, manager, device, skip: int, steps: int):
        self.device, self.skip, self.steps = device, skip, steps
        batch = manager.batch_processor
        self.owners = {"batch": batch, "io": batch.inputs_and_outputs, "runner": batch.model_runner}
        self.phase, self.done_steps, self.window_steps, self.window_began = "skip", 0, 0, 0.0
        self.host = {label: 0.0 for label, _, _ in LOOP_PHASES}
        self.windows: dict[str, dict] = {}
        self.profiler, self.error = None, None
        self.finished = threading.Event()
        self._patched: list[tuple[object, str]] = []

    def __enter__(self):
        for label, owner, name in LOOP_PHASES:
            target = self.owners[owner]
            inner = getattr(target, name)
            wrapper = self._prepare(inner) if name == "prepare_next_batch" else self._timed(label, inner, name)
            setattr(target, name, wrapper)  # an instance attribute, over the class's method
            self._patched.append((target, name))
        return self

    def __exit__(self, *exc):
        for target, name in self._patched:
            delattr(target, name)
        self._patched.clear()
        if self.profiler is not None and self.phase == "profiled":
            self.error = "the decoding loop never left the profiled window"
        return False

    def _timed(self, label, inner, name):
        def phase(*args, **kwargs):
            began = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                if self.phase == "timed":
                    self.host[label] += time.perf_counter() - began
                if name == "update_batch":
                    self.done_steps += 1
                    self.window_steps += self.phase in ("timed", "profiled")
        return phase

    def _prepare(self, inner):
        label = LOOP_PHASES[0][0]

        def prepare(*args, **kwargs):
            self._advance()
            began = time.perf_counter()
            ready = inner(*args, **kwargs)
            if self.phase == "timed":
                self.host[label] += time.perf_counter() - began
            if not ready and self.phase in ("timed", "profiled"):
                self._close_window(early=True)  # the batch emptied: nothing more to measure
            return ready
        return prepare

    def _advance(self) -> None:
        """At the top of a loop pass: open or close the windows by the steps done."""
        if self.phase == "skip" and self.done_steps >= self.skip:
            self._open("timed")
        elif self.phase in ("timed", "profiled") and self.window_steps >= self.steps:
            self._close_window(early=False)

    def _open(self, phase: str) -> None:
        if phase == "profiled":
            import torch
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            try:
                self.profiler = profile(activities=activities)
                self.profiler.start()
            except Exception as exc:  # noqa: BLE001 - never take the decoding thread down
                self.profiler, self.error = None, f"the profiler did not start: {one_line(exc)}"
                self.phase = "done"
                self.finished.set()
                return
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        self.phase, self.window_steps, self.window_began = phase, 0, time.perf_counter()

    def _close_window(self, early: bool) -> None:
        seconds = time.perf_counter() - self.window_began
        self.windows[self.phase] = {"steps": self.window_steps, "seconds": seconds}
        if self.phase == "profiled":
            try:
                self.profiler.stop()
            except Exception as exc:  # noqa: BLE001
                self.error = f"the profiler did not stop: {one_line(exc)}"
        if self.phase == "timed" and not early:
            self._open("profiled")
            return
        self.phase = "done"
        self.finished.set()

    def summary(self, concurrency: int) -> dict:
        """Figures a step: host phases (timed window), device kernels and API calls (profiled window)."""
        timed = self.windows.get("timed")
        if not timed or not timed["steps"]:
            return {"status": f"failed: the requests took {self.done_steps} decoding steps; the timed window "
                              f"starts after {self.skip}"}
        steps = timed["steps"]
        out = {"status": "ok", "concurrency": concurrency, "skip": self.skip, "steps": steps,
               "ms_per_step": round(1000 * timed["seconds"] / steps, 3),
               "host_ms_per_step": {label: round(1000 * s / steps, 3) for label, s in self.host.items()}}
        profiled = self.windows.get("profiled")
        if self.error or not profiled or not profiled["steps"] or self.profiler is None:
            out["profile"] = {"status": f"failed: {self.error or 'the requests ended before the profiled window'}"}
            return out
        out["profile"] = profile_summary(self.profiler.key_averages(), profiled["steps"], profiled["seconds"],
                                         self.device.type == "cuda")
        return out


def profile_summary(events, steps: int, seconds: float, cuda: bool, top: int = 6) -> dict:
    """A profiled window per step: wall ms, and on CUDA the ms in device kernels, the kernels run
    (graph replays included), the host's kernel launches, graph launches, copies and
    synchronisations; then the kernels with the most device time on CUDA (the operators with the most
    self CPU time elsewhere).

    On CUDA the device time is summed over the device's own events (kernels, copies), as torch's own
    table totals it: torch.profiler also hands each kernel's time to the operator that launched it
    (an aten::mm's "self device time" is its kernel's), so a sum over every event counts it twice."""
    def per_step(value: float) -> float:
        return round(value / steps, 3)

    def on_device(e) -> bool:
        return str(getattr(e, "device_type", "")).endswith("CUDA")

    def calls(*needles: str) -> float:  # the host's API calls (a copy is also a device event: not twice)
        return per_step(sum(e.count for e in events if not on_device(e) and any(n in e.key for n in needles)))

    out = {"status": "ok", "steps": steps, "wall_ms_per_step": round(1000 * seconds / steps, 3)}
    kernels = [e for e in events if on_device(e) and not getattr(e, "is_user_annotation", False)]
    if cuda:
        out.update(device_ms_per_step=per_step(sum(e.self_device_time_total for e in kernels) / 1000),
                   kernels_per_step=per_step(sum(e.count for e in kernels)),
                   launches_per_step=calls("LaunchKernel"), graph_launches_per_step=calls("GraphLaunch"),
                   copies_per_step=calls("Memcpy"), syncs_per_step=calls("Synchronize"))
    key = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    ranked = sorted((e for e in (kernels if cuda else events) if key(e) > 0), key=key, reverse=True)[:top]
    out["ranked_by"] = "device time" if cuda else "self CPU time"
    out["top"] = [{"op": e.key, "self_ms_per_step": per_step(key(e) / 1000), "calls_per_step": per_step(e.count)}
                  for e in ranked]
    return out


def profile_decoding(engine, requests, concurrency: int, device, skip: int, steps: int) -> dict:
    """DecodeProfiler around one round of `concurrency` requests sent together to a continuous engine."""
    manager = getattr(engine.batcher, "manager", None)
    if getattr(manager, "batch_processor", None) is None:
        return {"status": "skipped: not a continuous engine (no decoding loop to profile)"}
    if getattr(manager.batch_processor, "use_async_batching", False):
        return {"status": "skipped: asynchronous batching overlaps the phases a step is split into"}
    with DecodeProfiler(manager, device, skip, steps) as profiler:
        _serve_level(engine, requests[:concurrency], concurrency)
        profiler.finished.wait(timeout=30)
    return profiler.summary(concurrency)


def _serve_level(engine, requests, concurrency: int, timer: StepTimer | None = None) -> tuple[dict, dict]:
    """Closed-loop clients: `concurrency` threads, each sending its next request when answered."""
    latencies, tokens, batch_sizes, answers = [], [], [], {}
    lock = threading.Lock()
    pending = list(reversed(list(enumerate(requests))))

    def client():
        while True:
            with lock:
                if not pending:
                    return
                index, request = pending.pop()
            began = time.perf_counter()
            answer = engine.answer([request])[0]
            elapsed = time.perf_counter() - began
            with lock:
                latencies.append(elapsed)
                tokens.append(answer.completion_tokens)
                batch_sizes.append(answer.batch_size)
                answers[index] = answer.response

    steps_before = engine.batcher._step_counter() if hasattr(engine.batcher, "_step_counter") else None
    timed_before = timer.snapshot() if timer is not None else None
    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(client) for _ in range(concurrency)]:
            future.result()
    wall = time.perf_counter() - began
    row = _load_row(latencies, sum(tokens), wall)
    row["mean_batch"] = round(sum(batch_sizes) / len(requests), 2)
    if steps_before is not None:
        steps = engine.batcher._step_counter() - steps_before
        row["decode_steps"] = steps
        row["ms_per_step"] = round(1000 * wall / max(1, steps), 2)
        if timed_before is not None and not timer.asynchronous:
            seconds, calls = (now - then for now, then in zip(timer.snapshot(), timed_before))
            if calls:
                row["ms_in_step"] = round(1000 * seconds / calls, 2)
                row["ms_outside_step"] = round(max(0.0, row["ms_per_step"] - row["ms_in_step"]), 2)
    return row, answers


def part_serve(ctx) -> dict:
    """The endpoint's Engine (serve/engine.py) on 1B, old engine against new: `static` (the
    run-to-the-longest batcher) and `continuous` (transformers' continuous batching, CUDA graphs on
    a GPU), closed-loop clients at each concurrency, greedy answers of `serve_tokens` new tokens,
    the same requests for both (a level's first requests are the lower levels' requests). The order
    alternates per level (static first, then continuous first, ...), so neither engine always runs
    on a warmer GPU. At the first and last levels a third engine runs after the pair: continuous
    with transformers' own KV padding (`serve_padding_ab`, 16,384 tokens) instead of the endpoint's
    serve.batching.kv_padding_tokens, the A/B for what the padding of graphed steps costs (a CPU
    never pads, so there it only exercises the path). The engines are loaded once (a model copy
    each) and warmed up."""
    device = device_of(ctx)
    folder = materialise(ctx, "1b", _embedded_tokenizer(), device)
    questions = _questions()
    new_tokens = ctx["serve_tokens"]
    ab_padding = ctx["serve_padding_ab"]
    ab_levels = {ctx["serve_levels"][0], ctx["serve_levels"][-1]}
    variants = {"static": {"engine": "static"}, "continuous": {},
                "padding": {"kv_padding_tokens": ab_padding}}
    engines, notes, _ = _serve_engines(ctx, folder, device, variants)
    timers = {kind: _step_timer(engines[kind], device) for kind in ("continuous", "padding")}
    rows, answers, by_level = [], {}, {}
    for position, concurrency in enumerate(ctx["serve_levels"]):
        count = ctx["serve_requests"][position]
        order = ("static", "continuous") if position % 2 == 0 else ("continuous", "static")
        for kind in order + (("padding",) if concurrency in ab_levels else ()):
            label = f"continuous, kv padding {ab_padding:,}" if kind == "padding" else kind
            row, measured, got = _measure_level(ctx, engines[kind], label, notes[kind], questions, count,
                                                concurrency, device, timers.get(kind))
            rows.append(row)
            keep(ctx, rows)
            if measured is not None:
                answers[(kind, concurrency)] = got
                by_level.setdefault(concurrency, {})[kind] = measured
    # Where a decoding step of the endpoint's engine goes, alone and in a full batch; and, alone, the
    # same for the engine with transformers' KV padding: the step the A/B compares, kernel by kernel.
    # The engines' own step, as an endpoint runs it: without the levels' step timers.
    _remove_timers(timers)
    decode_profile = {}
    profiled = [(str(level), "continuous", level) for level in sorted(ab_levels)]
    profiled.append((f"{min(ab_levels)}, kv padding {ab_padding:,}", "padding", min(ab_levels)))
    for label, kind, concurrency in profiled:
        try:
            requests = _greedy_requests(engines[kind], questions, concurrency, new_tokens)
            decode_profile[label] = profile_decoding(engines[kind], requests, concurrency, device,
                                                     **ctx["serve_profile"])
        except Exception as exc:  # noqa: BLE001 - the levels' figures stand without it
            decode_profile[label] = {"status": f"failed: {one_line(exc)}"}
    for engine in engines.values():
        engine.batcher.close()
    ratios = {}
    for concurrency, pair in by_level.items():
        if "static" in pair and "continuous" in pair and pair["static"]["tokens_per_s"]:
            ratios[str(concurrency)] = {
                "tokens_per_s": round(pair["continuous"]["tokens_per_s"] / pair["static"]["tokens_per_s"], 2),
                "p95": round(pair["continuous"]["p95_s"] / max(pair["static"]["p95_s"], 1e-9), 2)}
    padding_ratios = {}
    for concurrency, runs in by_level.items():
        if "padding" in runs and "continuous" in runs and runs["padding"]["tokens_per_s"]:
            ours, theirs = runs["continuous"], runs["padding"]
            padding_ratios[str(concurrency)] = {
                "tokens_per_s": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2),
                "ms_per_step": [ours.get("ms_per_step"), theirs.get("ms_per_step")],
                "ms_in_step": [ours.get("ms_in_step"), theirs.get("ms_in_step")]}
    # Greedy answers: the same request at every level and in both engines (the first level's requests)
    first = ctx["serve_levels"][0]
    identical = {}
    for kind in ("static", "continuous"):
        alone = answers.get((kind, first), {})
        for concurrency in ctx["serve_levels"][1:]:
            crowd = answers.get((kind, concurrency), {})
            identical[f"{kind}: concurrency {first} vs {concurrency}"] = _agreement(alone, crowd)
    for concurrency in ctx["serve_levels"]:
        a, b = answers.get(("static", concurrency), {}), answers.get(("continuous", concurrency), {})
        identical[f"static vs continuous at {concurrency}"] = _agreement(a, b)
        c = answers.get(("padding", concurrency), {})
        if c:
            identical[f"continuous vs kv padding {ab_padding:,} at {concurrency}"] = _agreement(b, c)
    cb = getattr(engines["continuous"].batcher, "cb_config", None)
    return {"status": "ok", "rows": rows, "continuous_over_static": ratios, "identical_answers": identical,
            "kv_padding": {"ours": getattr(cb, "kv_padding_interval_size", None), "ab": ab_padding,
                           # transformers pads only for CUDA graphs (or compile): without them both do the same work
                           "padded": _graphed(cb), "ours_over_ab": padding_ratios},
            "decode_profile": decode_profile}


def part_serve_compile(ctx) -> dict:
    """serve.batching.compile_level: the endpoint's continuous engine with its decoding step compiled
    (transformers' default_compile_level `serve_compile_level`, inductor, inside the CUDA graphs on a
    GPU) against the same engine uncompiled, at the serve part's first and last concurrency. Each
    engine is loaded fresh, in this part's own process and inductor cache (bench/gpu.py), so "ready
    in" holds the compilation a new endpoint instance pays once. The order alternates per level, as
    in the serve part. Prints compiled / eager output tokens/s and ms per decoding step, and how many
    greedy answers agree (on a GPU in bf16 fused kernels may round differently; on a CPU in fp32 they
    agree)."""
    from serve.engine import prepare_compile

    level = ctx["serve_compile_level"]
    try:
        prepare_compile(level)
    except ValueError as exc:
        raise Skip(str(exc)) from None
    device = device_of(ctx)
    folder = materialise(ctx, "1b", _embedded_tokenizer(), device)
    questions = _questions()
    engines, notes, ready = _serve_engines(ctx, folder, device, {"eager": {}, "compiled": {"compile_level": level}})
    timers = {kind: _step_timer(engine, device) for kind, engine in engines.items()}
    levels = sorted({ctx["serve_levels"][0], ctx["serve_levels"][-1]})
    rows, by_level, answers = [], {}, {}
    for position, concurrency in enumerate(levels):
        count = ctx["serve_requests"][ctx["serve_levels"].index(concurrency)]
        order = ("eager", "compiled") if position % 2 == 0 else ("compiled", "eager")
        for kind in order:
            label = f"continuous, compile level {level}" if kind == "compiled" else "continuous"
            row, measured, got = _measure_level(ctx, engines[kind], label, notes[kind], questions, count,
                                                concurrency, device, timers[kind])
            rows.append(row)
            keep(ctx, rows)
            if measured is not None:
                by_level.setdefault(concurrency, {})[kind] = measured
                answers[(kind, concurrency)] = got
    # The compiled step alone, phase by phase and kernel by kernel: beside the serve part's profile of
    # the eager engine, the kernels a step runs say how much the compilation fused (without the levels'
    # step timers, as the serve part profiles)
    _remove_timers(timers)
    decode_profile = {}
    label = f"{levels[0]}, compile level {level}"
    try:
        requests = _greedy_requests(engines["compiled"], questions, levels[0], ctx["serve_tokens"])
        decode_profile[label] = profile_decoding(engines["compiled"], requests, levels[0], device, **ctx["serve_profile"])
    except Exception as exc:  # noqa: BLE001 - the levels' figures stand without it
        decode_profile[label] = {"status": f"failed: {one_line(exc)}"}
    for engine in engines.values():
        engine.batcher.close()
    ratios = {}
    for concurrency, pair in by_level.items():
        if len(pair) == 2 and pair["eager"]["tokens_per_s"]:
            ratios[str(concurrency)] = {
                "tokens_per_s": round(pair["compiled"]["tokens_per_s"] / pair["eager"]["tokens_per_s"], 2),
                "ms_per_step": [pair["compiled"].get("ms_per_step"), pair["eager"].get("ms_per_step")],
                "identical_answers": _agreement(answers[("compiled", concurrency)], answers[("eager", concurrency)])}
    return {"status": "ok", "rows": rows, "level": level, "ready_s": ready, "compiled_over_eager": ratios,
            "decode_profile": decode_profile}


def part_serve_static_cache(ctx) -> dict:
    """Issue 22's per-stream lever as transformers ships it: `model.generate` with a static KV cache,
    whose decoding step transformers compiles on a GPU (its CompileConfig: inductor,
    mode="reduce-overhead", i.e. CUDA graphs), against the same static cache uncompiled. Not the
    endpoint's engine: a reference for what one stream (batch 1, requests one after another) and one
    static batch of the last level's size (every row decodes to the longest) reach on this GPU, beside
    the serve part's continuous engine at concurrency 1 and 32. The same prompts as the endpoint's
    (its chat format and default system prompt), greedy answers of `serve_tokens` new tokens, decoded
    by the project's generate_batch (stages/core/generate.py, what the static engine runs). The cache
    is sized once for the endpoint's longest request (`max_cache_len`), so one compiled graph serves
    every prompt length at a batch size; "first call" is that batch size's compilation. On a CPU
    transformers does not compile generate by itself: the smoke forces it (CompileConfig's
    _compile_all_devices), which runs the compiled path's code, not its speed."""
    from serve.codefolder import serve_config
    from serve.engine import prepare_compile
    from stages.core.chat import chat_format

    try:
        prepare_compile(1)  # a C compiler, and room for dynamo's entries
    except ValueError as exc:
        raise Skip(str(exc)) from None
    device = device_of(ctx)
    tokenizer = _embedded_tokenizer()
    folder = materialise(ctx, "1b", tokenizer, device)
    config = serve_config()
    fmt = chat_format(tokenizer)
    questions = _questions()
    prompts = [fmt.prompt_ids(config["default_system"], q) for q in questions]
    longest = (int(config["max_system_tokens"]) + int(config["max_instruction_tokens"]) + 64
               + int(config["max_new_tokens_limit"]))  # as serve.engine sizes a continuous engine's requests
    last = ctx["serve_levels"][-1]  # one static batch of the serve part's largest concurrency
    batches = {1: [[p] for p in prompts[:ctx["serve_requests"][0]]], last: [prompts[:last]]}
    models, held_mb = {}, {}
    for kind in ("eager", "compiled"):
        before_mb = allocated_mb(device)
        models[kind] = _static_cache_model(folder, device, fmt, longest, compiled=kind == "compiled", smoke=ctx["smoke"])
        held_mb[kind] = allocated_mb(device) - before_mb
    rows, answers, first_call, by_size = [], {}, {}, {}
    for size, calls in batches.items():  # one stream first: the concurrency-1 target is the furthest off
        short = _static_batch_short_of_time(ctx.get("part_deadline"), first_call.get("generate, static cache, compiled, batch 1"))
        for kind, model in models.items():
            label = f"generate, static cache, {kind}, batch {size}"
            row = {"part": "serve_static_cache", "model": model_name(ctx, "1b"), "run": label,
                   "setting": (f"model.generate, static KV cache of {longest:,} tokens, "
                               + ("decoding step compiled (transformers' CompileConfig: inductor, reduce-overhead)"
                                  if kind == "compiled" else "not compiled")
                               + f", {ctx['serve_tokens']} new tokens, greedy; "
                               + ("requests one after another" if size == 1 else "one static batch, rows decode to the longest"))}
            if size > 1 and short:
                row["status"] = f"skipped: {short}"
                rows.append(row)
                keep(ctx, rows)
                continue
            try:
                began = time.perf_counter()
                _static_generate(model, calls[0], fmt, ctx["serve_tokens"], device)
                first_call[label] = round(time.perf_counter() - began, 1)
                if kind == "compiled" and not hasattr(model, "_compiled_call"):
                    # transformers skips compilation with a warning when its criteria fail: say so, not "compiled"
                    raise RuntimeError("transformers did not compile generate's decoding step (its auto-compile "
                                       "criteria were not met)")
                measured, got = _static_cache_level(model, calls, fmt, ctx["serve_tokens"], device, held_mb[kind])
                row.update(measured, first_call_s=first_call[label])
                row["setting"] += f"; first call (untimed{', compilation' if kind == 'compiled' else ''}) {first_call[label]:,.1f} s"
                answers[(kind, size)] = got
                by_size.setdefault(size, {})[kind] = row
            except Exception as exc:  # noqa: BLE001 - the other rows stand without it
                row["status"] = f"failed: {one_line(exc)}"
            rows.append(row)
            keep(ctx, rows)
    del models
    release(device)
    ratios = {}
    for size, pair in by_size.items():
        eager, compiled = pair.get("eager"), pair.get("compiled")
        if eager and compiled and eager["tokens_per_s"]:
            ratios[str(size)] = {"tokens_per_s": round(compiled["tokens_per_s"] / eager["tokens_per_s"], 2),
                                 "ms_per_step": [compiled["ms_per_step"], eager["ms_per_step"]],
                                 "first_call_s": [compiled["first_call_s"], eager["first_call_s"]],
                                 "identical_answers": _agreement(answers[("compiled", size)], answers[("eager", size)])}
    return {"status": "ok", "rows": rows, "max_cache_len": longest, "compiled_over_eager": ratios}


# serve_static_cache's static batch after the one stream: its compilation took about as long as the
# stream's (a new batch size is a new graph) in the CPU smoke; with 50% margin, and 30 s for loading
# nothing new, the uncompiled batch and the timed runs.
STATIC_BATCH_COMPILE_MARGIN, STATIC_BATCH_REST_S = 1.5, 30.0


def _static_batch_short_of_time(deadline: float | None, stream_compile_s: float | None) -> str:
    """Why the static batch would not finish before the part is stopped ("" when it would, or when
    there is no deadline or no compilation figure to judge by): a part stopped at its cap returns
    nothing, so the batch is skipped and the stream's rows come back."""
    if deadline is None or stream_compile_s is None:
        return ""
    need = STATIC_BATCH_COMPILE_MARGIN * stream_compile_s + STATIC_BATCH_REST_S
    left = deadline - time.time()
    if left >= need:
        return ""
    return (f"the part's time: about {need:.0f} s needed (1.5 x batch 1's {stream_compile_s:.0f} s compilation + "
            f"{STATIC_BATCH_REST_S:.0f} s), {max(0.0, left):.0f} s left before the kit stops it")


def _static_cache_model(folder, device, fmt, max_cache_len: int, compiled: bool, smoke: bool):
    """The 1B folder loaded as the endpoint loads it (bf16 on a GPU, fp32 on a CPU), its generation
    config set for a static cache of `max_cache_len`, compiled by transformers or not."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.configuration_utils import CompileConfig

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    generation = model.generation_config
    generation.cache_implementation = "static"
    generation.max_cache_len = max_cache_len
    generation.disable_compile = not compiled
    if compiled:
        generation.compile_config = CompileConfig()
        # transformers compiles generate's decoding step by itself on CUDA only; the smoke runs that path on a CPU
        generation.compile_config._compile_all_devices = smoke
    return model


def _static_generate(model, prompts, fmt, new_tokens: int, device):
    from stages.core.generate import generate_batch

    generations = generate_batch(model, prompts, new_tokens, fmt)
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
    return generations


def _static_cache_level(model, calls: list[list[list[int]]], fmt, new_tokens: int, device,
                        held_mb: float) -> tuple[dict, dict]:
    """Each call (a list of prompts) one after another, timed: output tokens/s, latencies (a row's is
    its call's), ms per decoding step (each call decodes to its longest row), the answers by request,
    and on CUDA the model's own peak (its `held_mb` of weights plus what the calls added)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    base_mb = allocated_mb(device)
    latencies, tokens, steps, answers = [], 0, 0, {}
    began = time.perf_counter()
    for call in calls:
        started = time.perf_counter()
        generations = _static_generate(model, call, fmt, new_tokens, device)
        took = time.perf_counter() - started
        for generation in generations:
            latencies.append(took)
            answers[len(answers)] = generation.token_ids
            tokens += len(generation.token_ids)
        steps += max(len(g.token_ids) + g.finished for g in generations)
    wall = time.perf_counter() - began
    row = _load_row(latencies, tokens, wall)
    row.update(decode_steps=steps, ms_per_step=round(1000 * wall / max(1, steps), 2))
    if device.type == "cuda":
        row["peak_mb"] = own_peak_mb(device, held_mb, base_mb)
    return row, answers


def _embedded_tokenizer():
    from stages.core.modeling import load_tokenizer

    return load_tokenizer("embedded")


def _questions() -> list[str]:
    """The data's distinct questions, in order: the serve parts' requests."""
    from bench.train_bench import load_records

    rows, _ = load_records(DATA, None)
    return list(dict.fromkeys(r["instruction"] for r in rows))


def _serve_engines(ctx, folder, device, variants: dict) -> tuple[dict, dict, dict]:
    """One Engine per variant (a name and its serve.batching overrides over params.yaml's, with the
    kit's max_batch and CUDA graphs; the response cache off), each with a note on how long it took to
    be ready, and those seconds. A continuous engine whose CUDA graphs fail on a GPU is built again
    without them, and its note says so. Each engine's `held_mb` (the CUDA memory it took while it was
    built) is set on it for its levels' peaks (own_peak_mb)."""
    from serve.codefolder import serve_config
    from serve.engine import Engine

    base = serve_config()
    base["cache"] = {**base["cache"], "enabled": False}  # every request decoded: measure the model, not the cache
    base["log_path"] = ""
    engines, notes, ready = {}, {}, {}
    for kind, overrides in variants.items():
        batching = {**base["batching"], "max_batch": ctx["serve_max_batch"], "engine": "continuous",
                    "cuda_graphs": ctx["serve_cuda_graphs"], **overrides}
        config = {**base, "batching": batching}
        began, before_mb = time.perf_counter(), allocated_mb(device)
        try:
            engines[kind] = Engine(folder, config, device=device.type)
        except Exception as exc:  # noqa: BLE001 - CUDA graphs refused: the engine without them
            if batching["engine"] == "static" or device.type != "cuda" or batching["cuda_graphs"] == "off":
                raise
            notes[kind] = f"CUDA graphs failed ({one_line(exc)}); without them. "
            batching["cuda_graphs"] = "off"
            engines[kind] = Engine(folder, config, device=device.type)
        ready[kind] = round(time.perf_counter() - began, 1)
        engines[kind].held_mb = allocated_mb(device) - before_mb
        notes[kind] = notes.get(kind, "") + f"ready in {ready[kind]:.1f} s"
    return engines, notes, ready


def allocated_mb(device) -> float:
    """The CUDA memory this process holds now (0 elsewhere)."""
    import torch

    return torch.cuda.memory_allocated(device) / 2 ** 20 if device.type == "cuda" else 0.0


def own_peak_mb(device, held_mb: float, base_mb: float) -> float:
    """One engine's (or model's) peak in a process that holds several: the memory it held when built
    (`held_mb`: weights, KV cache, captured graphs) plus what the run added over the `base_mb` that
    was allocated when the peak counter was reset. The process's own peak would count every resident
    engine (three model copies in the serve part)."""
    import torch

    return round(held_mb + torch.cuda.max_memory_allocated(device) / 2 ** 20 - base_mb, 1)


def _step_timer(engine, device) -> StepTimer | None:
    manager = getattr(engine.batcher, "manager", None)
    return StepTimer(manager, device) if manager is not None else None


def _measure_level(ctx, engine, label: str, note: str, questions: list[str], count: int, concurrency: int,
                   device, timer: StepTimer | None) -> tuple[dict, dict | None, dict | None]:
    """One engine at one concurrency: `count` greedy requests from closed-loop clients, after an
    untimed round where the engine replays CUDA graphs. Returns (the table row, the figures or None
    when it failed, the answers by request)."""
    import torch

    cb = getattr(engine.batcher, "cb_config", None)
    static = cb is None
    setting = (f"{'static' if static else 'continuous'} engine, max_batch {ctx['serve_max_batch']}, "
               f"{ctx['serve_tokens']} new tokens, greedy, cache off")
    if not static:
        graphs, padding = getattr(cb, "use_cuda_graph", None), getattr(cb, "kv_padding_interval_size", None)
        setting += f", CUDA graphs {graphs}, kv padding {padding:,}" if padding else f", CUDA graphs {graphs}"
        level = getattr(cb, "default_compile_level", 0)
        if level:
            setting += f", compile level {level}"
    row = {"part": "serve", "model": model_name(ctx, "1b"), "run": f"{label}, concurrency {concurrency}",
           "setting": f"{setting}; {note}"}
    try:
        requests = _greedy_requests(engine, questions, count, ctx["serve_tokens"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        base_mb = allocated_mb(device)
        if _graphed(cb):
            # CUDA graphs are captured per padded size the first time a size occurs: one untimed
            # round of the level (its first `concurrency` requests, together) takes the batch's
            # cache through the sizes the level reaches, so the timed pass is closer to the steady
            # state an endpoint serves in. The staggered timed pass can still meet a few new sizes (a
            # prefill beside long decodes) and capture them.
            _serve_level(engine, requests[:concurrency], concurrency)
            row["setting"] += "; graphs captured in an untimed round of the level's first requests"
        measured, answers = _serve_level(engine, requests, concurrency, timer)
        row.update(measured)
        if device.type == "cuda":
            row["peak_mb"] = own_peak_mb(device, getattr(engine, "held_mb", 0.0), base_mb)
        return row, measured, answers
    except Exception as exc:  # noqa: BLE001
        row["status"] = f"failed: {one_line(exc)}"
        return row, None, None


def _greedy_requests(engine, questions: list[str], count: int, new_tokens: int) -> list:
    """`count` greedy requests of `new_tokens` new tokens, the data's questions in order (repeated)."""
    return [engine.parse({"instruction": questions[i % len(questions)], "max_new_tokens": new_tokens,
                          "temperature": 0})[0][0] for i in range(count)]


def _agreement(a: dict, b: dict) -> str:
    """"same/shared": of the requests both runs answered, how many got the same answer."""
    shared = [i for i in a if i in b]
    return f"{sum(a[i] == b[i] for i in shared)}/{len(shared)}"


def _graphed(cb_config) -> bool:
    """Whether a continuous engine's config replays CUDA graphs (a bool, or one per path)."""
    graphs = getattr(cb_config, "use_cuda_graph", None)
    return bool(any(graphs) if isinstance(graphs, (tuple, list)) else graphs)


def _load_row(latencies: list[float], output_tokens: int, wall: float) -> dict:
    """A serving measurement's figures: requests (one latency each), their rate, output tokens/s over
    the wall time, p50/p95 latency and mean output tokens."""
    ordered, count = sorted(latencies), len(latencies)
    return {"requests": count, "requests_per_s": round(count / wall, 3), "tokens_per_s": round(output_tokens / wall, 1),
            "p50_s": round(_percentile(ordered, 0.50), 3), "p95_s": round(_percentile(ordered, 0.95), 3),
            "mean_output_tokens": round(output_tokens / count, 1), "wall_s": round(wall, 3)}


def _remove_timers(timers: dict) -> None:
    """The levels' step timers off their engines, before a decoding profile (StepTimer.remove)."""
    for timer in timers.values():
        if timer is not None:
            timer.remove()


def _percentile(ordered: list[float], q: float) -> float:
    index = (len(ordered) - 1) * q
    low, high = int(index), min(int(index) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (index - low)


PARTS = {
    "matmul": part_matmul,
    "train_1b": lambda ctx: part_train(ctx, "1b"),
    "loss_head": part_loss_head,
    "qlora": part_qlora,
    "serve": part_serve,
    "train_3b": lambda ctx: part_train(ctx, "3b", baseline=False),
    "compile": part_compile,
    "serve_compile": part_serve_compile,
    "serve_static_cache": part_serve_static_cache,
}
