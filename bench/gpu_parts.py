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


def workload(ctx, tokenizer):
    """(params, train examples, val examples) of the fixed slice the training parts share."""
    from bench.train_bench import bench_params, encode_rows, load_records

    overrides = {"pack_tokens": ctx["pack_tokens"]} if ctx.get("pack_tokens") else {}
    params = bench_params(ctx["epochs"], **overrides)
    train_rows, val_rows = load_records(DATA, ctx["records"])
    if ctx["smoke"]:
        val_rows = val_rows[:4]
    return params, encode_rows(tokenizer, train_rows), encode_rows(tokenizer, val_rows)


def materialise(ctx, size: str, tokenizer, device) -> Path:
    """A saved model folder (config, bf16 random weights, tokenizer) for the loaders that need a path:
    the 4-bit loader (QLoRA) and the endpoint's Engine. Written once per run, renamed into place."""
    import torch
    from transformers import LlamaForCausalLM

    from bench.train_bench import GPU_MODELS
    from stages.core.chat import chat_format
    from stages.core.estimate import model_config
    from stages.core.modeling import load_base_model
    from stages.core.params import load_params

    name = model_name(ctx, size)
    path = Path(ctx["work_dir"]) / f"model-{name}"
    if (path / "config.json").is_file():
        return path
    params = load_params(ROOT / "params.yaml")
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


def part_train(ctx, size: str) -> dict:
    """This project's train loop (its best settings) vs the plain Trainer + PEFT baseline."""
    from bench.train_bench import measure_variant
    from stages.core.modeling import load_tokenizer, resolve_dtype

    device = device_of(ctx)
    name = model_name(ctx, size)
    tokenizer = load_tokenizer("embedded")
    params, train_ex, val_ex = workload(ctx, tokenizer)
    dtype = resolve_dtype(params.train.precision, device)
    rows, results = [], {}
    for variant in ("ours", "baseline"):
        release(device)
        try:
            r = measure_variant(variant, name, params, tokenizer, train_ex, val_ex, device, dtype,
                                warmup_records=ctx["warmup_records"], peak_flops=ctx.get("peak_flops"))
        except Exception as exc:  # noqa: BLE001 - one variant failing leaves the other's figures
            rows.append({"part": "train", "model": name, "run": variant, "status": f"failed: {one_line(exc)}"})
            continue
        results[variant] = r
        rows.append({"part": "train", "model": name, "run": variant, "setting": r["setting"],
                     "tokens_per_s": r["tokens_per_s"], "mfu": r.get("mfu"), "peak_mb": r["peak_mb"],
                     "final_loss": r["final_val_loss"], "train_s": r["train_s"], "real_tokens": r["real_tokens"],
                     "records": r["records"], "epochs": r["epochs"]})
    out = {"status": "ok", "rows": rows, "model": name}
    if "ours" in results and "baseline" in results:
        out["speedup"] = round(results["ours"]["tokens_per_s"] / results["baseline"]["tokens_per_s"], 3)
    if not results:
        out["status"] = "failed: " + "; ".join(row["status"][len("failed: "):] for row in rows)
    return out


def part_loss_head(ctx) -> dict:
    """The loss head alone, forward + backward, on one micro-batch of hidden states: liger's fused
    linear cross-entropy vs logits at labelled positions vs logits everywhere (the baseline's way).
    Calls stages.core.training.completion_loss_sum, the function the train loop uses."""
    import torch

    from stages.core.chat import IGNORE_INDEX
    from stages.core.estimate import model_config
    from stages.core.modeling import load_tokenizer
    from stages.core.params import load_params
    from stages.core.training import Batch, completion_loss_sum, package_available

    from bench.train_bench import GPU_MODELS

    device = device_of(ctx)
    name = model_name(ctx, "1b")
    params = load_params(ROOT / "params.yaml")
    base = params.model if name == "embedded" else params.model.model_copy(update={"base": GPU_MODELS[name]})
    config = model_config(base)
    hidden_size, vocab = config.hidden_size, config.vocab_size
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    tokens = 64 if ctx["smoke"] else ctx["pack_tokens"] or params.train.pack_tokens
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
    return {"status": "ok", "rows": rows, "peak_note": "peak_mb: memory the head adds over its inputs"}


def part_qlora(ctx) -> dict:
    """QLoRA (bitsandbytes nf4 base) on 1B with the train stage's own model construction, same slice
    and settings as the bf16 LoRA "ours" run of the train part."""
    import torch

    from bench.train_bench import measure_variant
    from stages.core.modeling import load_tokenizer
    from stages.core.params import ConfigError
    from stages.core.training import check_method, package_available
    from stages.train import build_model_hf  # imported before the check, so the smoke proves it imports

    try:
        check_method("qlora", torch.cuda.is_available() and not ctx["smoke"], package_available("bitsandbytes"))
    except ConfigError as exc:
        raise Skip(str(exc)) from None

    device = device_of(ctx)
    tokenizer = load_tokenizer("embedded")
    params, train_ex, val_ex = workload(ctx, tokenizer)
    folder = materialise(ctx, "1b", tokenizer, device)
    params = params.model_copy(update={
        "model": params.model.model_copy(update={"base": str(folder)}),
        "train": params.train.model_copy(update={"method": "qlora"})})
    release(device)
    model = build_model_hf(params, device, torch.bfloat16, tokenizer=tokenizer)
    r = measure_variant("ours", "1b", params, tokenizer, train_ex, val_ex, device, torch.bfloat16,
                        warmup_records=ctx["warmup_records"], peak_flops=ctx.get("peak_flops"), model=model)
    q = params.train.quantization
    rows = [{"part": "qlora", "model": "1b", "run": "qlora",
             "setting": f"nf4 (double quant {q.double_quant}), {r['setting']}",
             "tokens_per_s": r["tokens_per_s"], "mfu": r.get("mfu"), "peak_mb": r["peak_mb"],
             "final_loss": r["final_val_loss"], "train_s": r["train_s"], "real_tokens": r["real_tokens"]}]
    lora = next((row for row in ctx.get("train_rows", []) if row.get("run") == "ours" and "tokens_per_s" in row), None)
    out = {"status": "ok", "rows": rows}
    if lora:
        out["vs_bf16_lora"] = {"tokens_per_s_ratio": round(r["tokens_per_s"] / lora["tokens_per_s"], 3),
                               "peak_mb_ratio": round(r["peak_mb"] / lora["peak_mb"], 3)}
    return out


def part_serve(ctx) -> dict:
    """The endpoint's Engine (serve/engine.py: prompt building, dynamic batcher, generate_batch) on
    1B, closed-loop clients at each concurrency, greedy answers of `serve_tokens` new tokens."""
    import torch

    from bench.train_bench import load_records
    from serve.codefolder import serve_config
    from serve.engine import Engine
    from stages.core.modeling import load_tokenizer

    device = device_of(ctx)
    name = model_name(ctx, "1b")
    folder = materialise(ctx, "1b", load_tokenizer("embedded"), device)
    rows_data, _ = load_records(DATA, None)
    questions = list(dict.fromkeys(r["instruction"] for r in rows_data))
    base = serve_config()
    base["cache"] = {**base["cache"], "enabled": False}  # every request decoded: measure the model, not the cache
    new_tokens = ctx["serve_tokens"]
    rows, engines = [], {}
    asked = 0
    for concurrency, max_batch in ctx["serve_levels"]:
        max_batch = max_batch or base["batching"]["max_batch"]
        row = {"part": "serve", "model": name, "run": f"concurrency {concurrency}",
               "setting": f"Engine, max_batch {max_batch}, window {base['batching']['window_ms']} ms, "
                          f"{new_tokens} new tokens, greedy, cache off"}
        try:
            if max_batch not in engines:
                for old in engines.values():
                    old.batcher.close()
                engines.clear()
                release(device)
                config = {**base, "batching": {**base["batching"], "max_batch": max_batch}}
                engines[max_batch] = Engine(folder, config, device=device.type)
            engine = engines[max_batch]
            count = max(4, 2 * concurrency) if not ctx["smoke"] else 2 * concurrency
            requests = [engine.parse({"instruction": questions[(asked + i) % len(questions)],
                                      "max_new_tokens": new_tokens, "temperature": 0})[0][0] for i in range(count)]
            asked += count
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            latencies, tokens, batch_sizes = [], [], []
            lock = threading.Lock()
            pending = list(reversed(requests))

            def client():
                while True:
                    with lock:
                        if not pending:
                            return
                        request = pending.pop()
                    began = time.perf_counter()
                    answer = engine.answer([request])[0]
                    elapsed = time.perf_counter() - began
                    with lock:
                        latencies.append(elapsed)
                        tokens.append(answer.completion_tokens)
                        batch_sizes.append(answer.batch_size)

            began = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                for future in [pool.submit(client) for _ in range(concurrency)]:
                    future.result()
            wall = time.perf_counter() - began
            latencies.sort()
            row.update(requests=count, requests_per_s=round(count / wall, 3), tokens_per_s=round(sum(tokens) / wall, 1),
                       p50_s=round(_percentile(latencies, 0.50), 3), p95_s=round(_percentile(latencies, 0.95), 3),
                       mean_output_tokens=round(sum(tokens) / count, 1),
                       mean_batch=round(sum(batch_sizes) / count, 2))
            if device.type == "cuda":
                row["peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
        except Exception as exc:  # noqa: BLE001
            row["status"] = f"failed: {one_line(exc)}"
        rows.append(row)
    for engine in engines.values():
        engine.batcher.close()
    return {"status": "ok", "rows": rows}


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
    "train_3b": lambda ctx: part_train(ctx, "3b"),
}
