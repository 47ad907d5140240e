"""Training benchmark: this repo's train loop against a plain Hugging Face Trainer + PEFT baseline.

    python -m bench.train_bench                          # reference workload: all records, 4 epochs, LoRA r=32
    python -m bench.train_bench --records 200 --epochs 1 # quick
    python -m bench.train_bench --model 1b,3b            # GPU: exact Llama-3.2-1B/3B architectures, random weights
    python -m bench.train_bench --model smollm2-135m --records 256 --epochs 1 \
        --variants ours,ours-bf16,trl,baseline           # CPU: the pretrained preset vs TRL's SFTTrainer

Variants: ours (this train loop, fp32 on CPU), ours-noshare (the same with train.shared_prefix off),
ours-compiled (the same with train.compile on: torch.compile of the model body; give --warmup-records
so the compilation stays out of the timed run), ours-bf16 (bf16 base weights, fp32 adapters: only where
the CPU has AVX-512-BF16 or AMX), trl (TRL's SFTTrainer at its best settings for this workload:
padding-free batches, completion-only loss, the same LoRA, records and chat format), baseline (plain
transformers.Trainer + PEFT). --threads and --pack-tokens take comma lists to sweep them.

Both runs use the same model initialisation, LoRA config (r=32 from params.yaml), learning rate,
schedule, seed, records and effective batch (4 x accumulation 4). They differ only in how the work
is done:
- ours: stages.core.training.fit with params.yaml's speed settings (padding-free packing with
  position-id restarts, loss head only at labelled positions or liger fused cross-entropy on CUDA,
  SDPA);
- baseline: transformers.Trainer, DataCollatorForSeq2Seq dynamic padding to the longest record of
  each micro-batch, no packing, logits at every position (the model's own loss).
Each runs in its own child process, so peak memory (RSS on CPU, torch.cuda.max_memory_allocated on
GPU) is its own. Throughput counts real (non-pad) tokens only: the records' tokens x epochs /
training seconds (in-loop evaluation excluded for both). The final validation loss is measured the
same way for both (mean completion-token cross-entropy on the held-out records).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_MODELS = {"1b": "meta-llama/Llama-3.2-1B-Instruct", "3b": "meta-llama/Llama-3.2-3B-Instruct"}


def load_records(path: Path, limit: int | None) -> tuple[list[dict], list[dict]]:
    """Train and validation records: every 10th record (up to 100) is held out."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if limit:
        rows = rows[:limit]
    val = [r for i, r in enumerate(rows) if i % 10 == 9][:100]
    held = {id(r) for r in val}
    return [r for r in rows if id(r) not in held], val


PRESET_MODELS = ("embedded", "smollm2-135m")  # models with a preset (presets/NAME.yaml): real weights on CPU


def build(model_name: str, params, device, dtype):
    """A fresh base model with LoRA: a preset's model (embedded, SmolLM2), or a Llama-3.2 architecture
    with random weights."""
    import torch
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    from stages.core.estimate import model_config
    from stages.core.modeling import load_base_model, lora_config

    if model_name in PRESET_MODELS:
        model = load_base_model(params.model, dtype=dtype, device=device)
    else:
        config = model_config(params.model.model_copy(update={"base": GPU_MODELS[model_name]}))
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    if model.config._attn_implementation != params.train.attention:
        import stages.core.attention  # noqa: F401 - registers attention varlen

        model.set_attn_implementation(params.train.attention)
    if params.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, lora_config(params.train))


def _peak_reset(device):
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device) -> float:
    import torch

    from stages.core.training import rss_peak_mb

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else rss_peak_mb()


def run_variant(variant: str, model_name: str, records: int | None, epochs: int, threads: int, queue,
                pack_tokens: int | None = None, warmup_records: int = 0) -> None:
    """One benchmark run in this (child) process; puts a result dict on the queue."""
    try:
        queue.put(_run_variant(variant, model_name, records, epochs, threads, pack_tokens, warmup_records))
    except Exception as exc:  # noqa: BLE001 - reported in the table instead of killing the other run
        queue.put({"variant": variant, "model": model_name, "error": f"{type(exc).__name__}: {exc}"})


def _run_variant(variant, model_name, records, epochs, threads, pack_tokens=None, warmup_records=0):
    import torch

    sys.path.insert(0, str(ROOT))
    from stages.core.modeling import load_tokenizer, resolve_device, resolve_dtype

    torch.set_num_threads(threads)
    params = bench_params(epochs, **({"pack_tokens": pack_tokens} if pack_tokens else {}))
    if model_name in PRESET_MODELS:
        params = with_preset(params, model_name, epochs)
    if variant == "ours-noshare":  # shared-prefix packing off: every record computes its system prompt
        params = params.model_copy(update={"train": params.train.model_copy(update={"shared_prefix": False})})
    if variant == "ours-compiled":  # torch.compile of the model body (train.compile on)
        params = params.model_copy(update={"train": params.train.model_copy(update={"compile": "on"})})
    device = resolve_device()
    precision = "bf16" if variant.endswith("-bf16") else params.train.precision
    dtype = resolve_dtype(precision, device)
    tokenizer = load_tokenizer(params.model.tokenizer)
    train_rows, val_rows = load_records(ROOT / "data/raw/corporate_qa.jsonl", records)
    train_ex, val_ex = encode_rows(tokenizer, train_rows), encode_rows(tokenizer, val_rows)
    result = measure_variant(variant, model_name, params, tokenizer, train_ex, val_ex, device, dtype,
                             warmup_records=warmup_records)
    return {**result, "threads": threads, "cpu_kernels": torch.backends.cpu.get_cpu_capability()}


def with_preset(params, name: str, epochs: int):
    """params with presets/NAME.yaml applied (the benchmark's epochs and batch kept)."""
    import yaml

    from stages.core.params import Params
    from stages.preset import applied, load_preset

    preset = {k: v for k, v in load_preset(name).items() if k not in ("train.epochs", "train.evals_per_epoch")}
    return Params.model_validate(applied(params.model_dump(mode="json"), preset))


def bench_params(epochs: int, **train_overrides):
    """params.yaml with the benchmark's fixed schedule: no early stopping, one evaluation per epoch,
    4 records x accumulation 4 per step (the reference template's effective batch)."""
    from stages.core.params import load_params

    params = load_params(ROOT / "params.yaml")
    return params.model_copy(update={"train": params.train.model_copy(update={
        "epochs": epochs, "early_stopping_patience": 0, "evals_per_epoch": 1,
        "batch_size": 4, "gradient_accumulation_steps": 4, **train_overrides})})


def encode_rows(tokenizer, rows: list[dict]) -> list:
    from stages.core.chat import chat_format

    fmt = chat_format(tokenizer)
    return [fmt.encode(r["system"], r["instruction"], r["output"]) for r in rows]


def measure_variant(variant: str, model_name: str, params, tokenizer, train_ex, val_ex, device, dtype, *,
                    warmup_records: int = 0, peak_flops: float | None = None, model=None) -> dict:
    """Train one variant ("ours" or "baseline") on a fresh model and measure it.

    warmup_records: first run the same code on that many records at learning rate 0 (weights
    unchanged), so one-off costs (kernel compilation, allocator growth, cuBLAS handles) stay out of
    the timed run. peak_flops: the MFU denominator (default: the GPU's datasheet bf16 peak).
    model: a ready peft model (default: `build(model_name, ...)`).
    """
    import torch

    from stages.core.training import (evaluate_loss, fit, package_available, seed_everything, select_loss_head,
                                      uses_shared_prefix)

    from stages.core.chat import chat_format

    train = params.train
    epochs = train.epochs
    pad_id = chat_format(tokenizer).pad_id
    real_tokens = sum(len(e.input_ids) for e in train_ex) * epochs
    seed_everything(train.seed)
    if model is None:
        model = build(model_name, params, device, dtype)
    if variant.startswith("ours"):
        head = select_loss_head(train.fused_loss, device.type == "cuda", package_available("liger_kernel")).value
        run = lambda examples, t: _timings(fit(model, examples, val_ex if t is train else [], t,  # noqa: E731
                                               device=device, head_mode=head, log=lambda _m: None,
                                               pad_id=pad_id))
        setting = f"packing={train.packing} ({train.pack_tokens} tokens, shared prefix {uses_shared_prefix(train)}), head={head}, " \
                  f"{model.config._attn_implementation}, {str(dtype).removeprefix('torch.')} base" \
                  + (", torch.compile" if train.compile == "on" else "")
    elif variant == "trl":
        run = lambda examples, t: (_trl_sft(model, tokenizer, examples, t, device, dtype)[0], [])  # noqa: E731
        setting = "SFTTrainer, padding-free, completion-only loss"
    else:
        run = lambda examples, t: (_hf_trainer(model, tokenizer, examples, t, device, dtype)[0], [])  # noqa: E731
        setting = "Trainer, dynamic padding, full logits"
    warmup_s = 0.0
    if warmup_records:  # with train.compile on, this is where the compilation happens
        began = time.perf_counter()
        run(train_ex[:warmup_records], train.model_copy(update={"learning_rate": 0.0, "epochs": 1}))
        warmup_s = time.perf_counter() - began
    _peak_reset(device)
    began = time.perf_counter()
    seconds, marks = run(train_ex, train)
    wall = time.perf_counter() - began
    peak = _peak_mb(device)
    # packed as in training where the run packs (attention varlen takes packed rows only); the same
    # loss as padded batches (tests/test_training_core.py), so variants stay comparable
    val_loss = evaluate_loss(model, val_ex, 16, device, packing=train.packing and variant != "baseline",
                             pack_tokens=train.pack_tokens, pad_id=pad_id)
    out = {"variant": variant, "model": model_name, "device": device.type, "setting": setting,
           "records": len(train_ex), "epochs": epochs, "real_tokens": real_tokens,
           "train_s": round(seconds, 2), "wall_s": round(wall, 2), "warmup_s": round(warmup_s, 2),
           "tokens_per_s": round(real_tokens / seconds, 1), "peak_mb": round(peak, 1),
           "final_val_loss": round(val_loss, 4)}
    steady = steady_state(marks)
    if steady:
        out["steady"] = steady
    if device.type == "cuda":
        out["mfu"] = round(_mfu(params, model_name, out["tokens_per_s"], train_ex, peak_flops), 4)
        if steady:
            steady["mfu"] = round(_mfu(params, model_name, steady["tokens_per_s"], train_ex, peak_flops), 4)
    return out


def _timings(result) -> tuple[float, list[dict]]:
    return result.train_seconds, result.epoch_marks


def steady_state(marks: list[dict]) -> dict | None:
    """Real tokens/s after the first epoch, from fit's cumulative per-epoch marks; None under 2 epochs.

    The first epoch meets every packed row length for the first time (allocator growth, kernel
    selection: the H200 ran one configuration 30% slower as the first run of its process than as the
    third), so the epochs after it are the steady-state figure the GPU targets are about."""
    if len(marks) < 2:
        return None
    first, last = marks[0], marks[-1]
    seconds = last["train_seconds"] - first["train_seconds"]
    tokens = last["real_tokens"] - first["real_tokens"]
    if seconds <= 0 or tokens <= 0:
        return None
    return {"epochs": f"{first['epoch'] + 1}-{last['epoch']}", "tokens_per_s": round(tokens / seconds, 1),
            "first_epoch_tokens_per_s": round(first["real_tokens"] / max(first["train_seconds"], 1e-9), 1)}


def model_flops_per_token(params, model_name, examples) -> float:
    """Training FLOPs per real token (stages.core.estimate.flops_per_token) at the records' mean length."""
    from stages.core.estimate import flops_per_token, model_config, parameter_counts

    base = params.model if model_name == "embedded" else params.model.model_copy(update={"base": GPU_MODELS[model_name]})
    config = model_config(base)
    mean_len = sum(len(e.input_ids) for e in examples) / len(examples)
    return flops_per_token(config, "lora", parameter_counts(config, params.train), int(mean_len))


def _mfu(params, model_name, tokens_per_s, examples, peak_flops=None):
    import torch

    from stages.core.estimate import GPUS

    flops = model_flops_per_token(params, model_name, examples)
    if peak_flops:
        return tokens_per_s * flops / peak_flops
    name = torch.cuda.get_device_name(0)
    gpu = "H200" if "H200" in name else "H100-SXM" if ("H100" in name and "NVL" not in name) else \
        "H100-NVL" if "H100" in name else "A100-80GB" if "A100" in name else None
    peak = GPUS[gpu]["bf16_tflops"] * 1e12 if gpu else float("nan")
    return tokens_per_s * flops / peak


def _hf_trainer(model, tokenizer, train_ex, train, device, dtype):
    """The plain baseline: transformers.Trainer + PEFT, reference template settings."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from stages.core.chat import chat_format

    tokenizer.pad_token_id = chat_format(tokenizer).pad_id
    # A plain list is a map-style dataset for the Trainer's DataLoader; no `datasets` package needed
    # (the GPU image lacks it).
    dataset = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
               for e in train_ex]
    args = TrainingArguments(
        output_dir=str(Path("/tmp") / f"hf-baseline-{time.time_ns()}"), per_device_train_batch_size=4,
        gradient_accumulation_steps=4, num_train_epochs=train.epochs, learning_rate=train.learning_rate,
        warmup_steps=train.warmup_ratio, lr_scheduler_type="cosine", weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm, seed=train.seed, report_to="none", save_strategy="no",
        eval_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=device.type != "cuda",
        remove_unused_columns=False,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    began = time.perf_counter()
    output = trainer.train()
    wall = time.perf_counter() - began
    return float(output.metrics.get("train_runtime", wall)), wall


def _trl_sft(model, tokenizer, train_ex, train, device, dtype):
    """TRL's SFTTrainer at its best settings for this workload: padding-free batches (one row per
    micro-batch, position ids restart per record, no FLOP on padding), completion-only loss from our
    labels, the same peft model, records, chat format, effective batch and schedule."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from stages.core.chat import chat_format

    tokenizer.pad_token_id = chat_format(tokenizer).pad_id
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in train_ex])
    args = SFTConfig(
        output_dir=str(Path("/tmp") / f"trl-sft-{time.time_ns()}"), per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps, num_train_epochs=train.epochs,
        learning_rate=train.learning_rate, warmup_steps=train.warmup_ratio, lr_scheduler_type="cosine",
        weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm, seed=train.seed, report_to="none",
        save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=device.type != "cuda",
        padding_free=True, completion_only_loss=True, max_length=None, dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    began = time.perf_counter()
    output = trainer.train()
    wall = time.perf_counter() - began
    return float(output.metrics.get("train_runtime", wall)), wall


def table(results: list[dict]) -> str:
    head = ("| model | run | setting | real tokens/s | train time (s) | peak memory (MiB) | final val loss"
            + (" | MFU" if any("mfu" in r for r in results) else "") + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | failed: {r['error']} |")
            continue
        mfu = f" | {r['mfu']:.1%}" if "mfu" in r else ""
        threads = f", {r['threads']} threads" if "threads" in r and r["device"] == "cpu" else ""
        lines.append(f"| {r['model']} | {r['variant']} | {r['setting']}{threads} | {r['tokens_per_s']:,.0f} | "
                     f"{r['train_s']:.1f} | {r['peak_mb']:,.0f} | {r['final_val_loss']:.4f}{mfu} |")
    by_model: dict[str, dict] = {}
    for r in results:
        by_model.setdefault(r["model"], {})[r["variant"]] = r
    for model, pair in by_model.items():
        ours = pair.get("ours")
        for other in ("ours-noshare", "ours-bf16", "trl", "baseline"):
            base = pair.get(other)
            if ours and base and "error" not in ours and "error" not in base:
                lines.append(f"\n{model}: ours / {other} = {ours['tokens_per_s'] / base['tokens_per_s']:.2f}x real "
                             f"tokens/s, {base['train_s'] / ours['train_s']:.2f}x less training time, "
                             f"val loss {ours['final_val_loss']:.4f} vs {base['final_val_loss']:.4f}")
        compiled = pair.get("ours-compiled")
        if ours and compiled and "error" not in ours and "error" not in compiled:
            lines.append(f"\n{model}: ours-compiled / ours = {compiled['tokens_per_s'] / ours['tokens_per_s']:.2f}x "
                         f"real tokens/s, val loss {compiled['final_val_loss']:.4f} vs {ours['final_val_loss']:.4f}; "
                         f"warm-up {compiled['warmup_s']:.1f} s vs {ours['warmup_s']:.1f} s (the compilation)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m bench.train_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None,
                        help="comma list of embedded,1b,3b (default: 1b,3b on CUDA, embedded on CPU)")
    parser.add_argument("--records", type=int, default=None, help="use the first N records (default: all)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", default="2", help="CPU threads per run (comma list to sweep)")
    parser.add_argument("--pack-tokens", default="", help="train.pack_tokens for ours (comma list to sweep)")
    parser.add_argument("--variants", default="ours,baseline",
                        help="comma list of ours,ours-noshare (shared-prefix packing off),ours-compiled "
                             "(train.compile on),ours-bf16,trl,baseline")
    parser.add_argument("--warmup-records", type=int, default=0,
                        help="every run first trains this many records at learning rate 0, untimed (compilation, "
                             "allocator growth); 0 = none")
    parser.add_argument("--only", choices=["ours", "baseline"], default=None, help="(old spelling of --variants X)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    models = (args.model or ("1b,3b" if torch.cuda.is_available() else "embedded")).split(",")
    unknown = [m for m in models if m not in (*PRESET_MODELS, *GPU_MODELS)]
    if unknown:
        print(f"--model: unknown {unknown}; choose from {', '.join((*PRESET_MODELS, *GPU_MODELS))}", file=sys.stderr)
        return 2
    if any(m in GPU_MODELS for m in models) and not torch.cuda.is_available():
        print("--model 1b/3b needs a CUDA GPU (on CPU the benchmark uses the embedded default)", file=sys.stderr)
        return 2
    variants = [args.only] if args.only else args.variants.split(",")
    known = ("ours", "ours-noshare", "ours-compiled", "ours-bf16", "trl", "baseline")
    bad = [v for v in variants if v not in known]
    if bad:
        print(f"--variants: unknown {bad}; choose from {', '.join(known)}", file=sys.stderr)
        return 2
    if "ours-bf16" in variants and not torch.cuda.is_available():
        from stages.core.modeling import cpu_bf16_supported

        if not cpu_bf16_supported():
            print("ours-bf16: this CPU has neither AVX-512-BF16 nor AMX; skipped", file=sys.stderr)
            variants.remove("ours-bf16")
    threads = [int(t) for t in args.threads.split(",")]
    packs = [int(p) for p in args.pack_tokens.split(",") if p] or [None]
    ctx = mp.get_context("spawn")
    results = []
    for model in models:
        for variant in variants:
            for n_threads in threads:
                for pack in (packs if variant.startswith("ours") else [None]):
                    queue = ctx.Queue()
                    proc = ctx.Process(target=run_variant, args=(variant, model, args.records, args.epochs, n_threads,
                                                                 queue, pack, args.warmup_records))
                    proc.start()
                    result = queue.get()
                    proc.join()
                    print(json.dumps(result), flush=True)
                    results.append(result)
    print()
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
