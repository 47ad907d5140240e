"""Training benchmark: this repo's train loop against a plain Hugging Face Trainer + PEFT baseline.

    python -m bench.train_bench                          # reference workload: all records, 4 epochs, LoRA r=32
    python -m bench.train_bench --records 200 --epochs 1 # quick
    python -m bench.train_bench --model 1b,3b            # GPU: exact Llama-3.2-1B/3B architectures, random weights

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


def build(model_name: str, params, device, dtype):
    """A fresh base model with LoRA: the embedded default, or a Llama-3.2 architecture with random weights."""
    import torch
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    from stages.core.estimate import model_config
    from stages.core.modeling import load_base_model, lora_config

    if model_name == "embedded":
        model = load_base_model(params.model, dtype=dtype, device=device)
    else:
        config = model_config(params.model.model_copy(update={"base": GPU_MODELS[model_name]}))
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
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


def run_variant(variant: str, model_name: str, records: int | None, epochs: int, threads: int, queue) -> None:
    """One benchmark run in this (child) process; puts a result dict on the queue."""
    try:
        queue.put(_run_variant(variant, model_name, records, epochs, threads))
    except Exception as exc:  # noqa: BLE001 - reported in the table instead of killing the other run
        queue.put({"variant": variant, "model": model_name, "error": f"{type(exc).__name__}: {exc}"})


def _run_variant(variant, model_name, records, epochs, threads):
    import torch

    sys.path.insert(0, str(ROOT))
    from stages.core.chat import chat_format
    from stages.core.modeling import load_tokenizer, resolve_device, resolve_dtype
    from stages.core.params import load_params
    from stages.core.training import evaluate_loss, fit, package_available, seed_everything, select_loss_head

    torch.set_num_threads(threads)
    params = load_params(ROOT / "params.yaml")
    params = params.model_copy(update={"train": params.train.model_copy(update={
        "epochs": epochs, "early_stopping_patience": 0, "evals_per_epoch": 1,
        "batch_size": 4, "gradient_accumulation_steps": 4})})
    train = params.train
    device = resolve_device()
    dtype = resolve_dtype(train.precision, device)
    tokenizer = load_tokenizer(params.model.tokenizer)
    train_rows, val_rows = load_records(ROOT / "data/raw/corporate_qa.jsonl", records)
    fmt = chat_format(tokenizer)
    enc = lambda rows: [fmt.encode(r["system"], r["instruction"], r["output"]) for r in rows]  # noqa: E731
    train_ex, val_ex = enc(train_rows), enc(val_rows)
    real_tokens = sum(len(e.input_ids) for e in train_ex) * epochs
    seed_everything(train.seed)
    model = build(model_name, params, device, dtype)
    _peak_reset(device)
    if variant == "ours":
        head = select_loss_head(train.fused_loss, device.type == "cuda", package_available("liger_kernel")).value
        began = time.perf_counter()
        result = fit(model, train_ex, val_ex, train, device=device, head_mode=head, log=lambda _m: None)
        wall = time.perf_counter() - began
        seconds = result.train_seconds
        setting = f"packing={train.packing}, head={head}, {model.config._attn_implementation}"
    else:
        seconds, wall = _hf_trainer(model, tokenizer, train_ex, train, device, dtype)
        setting = "Trainer, dynamic padding, full logits"
    peak = _peak_mb(device)
    val_loss = evaluate_loss(model, val_ex, 16, device)
    out = {"variant": variant, "model": model_name, "device": device.type, "setting": setting,
           "records": len(train_ex), "epochs": epochs, "real_tokens": real_tokens,
           "train_s": round(seconds, 2), "wall_s": round(wall, 2),
           "tokens_per_s": round(real_tokens / seconds, 1), "peak_mb": round(peak, 1),
           "final_val_loss": round(val_loss, 4)}
    if device.type == "cuda":
        out["mfu"] = round(_mfu(params, model_name, out["tokens_per_s"], train_ex), 4)
    return out


def _mfu(params, model_name, tokens_per_s, examples):
    import torch

    from stages.core.estimate import GPUS, flops_per_token, model_config, parameter_counts

    base = params.model if model_name == "embedded" else params.model.model_copy(update={"base": GPU_MODELS[model_name]})
    config = model_config(base)
    mean_len = sum(len(e.input_ids) for e in examples) / len(examples)
    flops = flops_per_token(config, "lora", parameter_counts(config, params.train), int(mean_len))
    name = torch.cuda.get_device_name(0)
    gpu = "H200" if "H200" in name else "H100-SXM" if ("H100" in name and "NVL" not in name) else \
        "H100-NVL" if "H100" in name else "A100-80GB" if "A100" in name else None
    peak = GPUS[gpu]["bf16_tflops"] * 1e12 if gpu else float("nan")
    return tokens_per_s * flops / peak


def _hf_trainer(model, tokenizer, train_ex, train, device, dtype):
    """The plain baseline: transformers.Trainer + PEFT, reference template settings."""
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from stages.core.chat import chat_format

    tokenizer.pad_token_id = chat_format(tokenizer).pad_id
    dataset = Dataset.from_list([{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids),
                                  "labels": e.labels} for e in train_ex])
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


def table(results: list[dict]) -> str:
    head = ("| model | run | setting | real tokens/s | train time (s) | peak memory (MiB) | final val loss"
            + (" | MFU" if any("mfu" in r for r in results) else "") + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | failed: {r['error']} |")
            continue
        mfu = f" | {r['mfu']:.1%}" if "mfu" in r else ""
        lines.append(f"| {r['model']} | {r['variant']} | {r['setting']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['train_s']:.1f} | {r['peak_mb']:,.0f} | {r['final_val_loss']:.4f}{mfu} |")
    by_model: dict[str, dict] = {}
    for r in results:
        by_model.setdefault(r["model"], {})[r["variant"]] = r
    for model, pair in by_model.items():
        ours, base = pair.get("ours"), pair.get("baseline")
        if ours and base and "error" not in ours and "error" not in base:
            lines.append(f"\n{model}: ours / baseline = {ours['tokens_per_s'] / base['tokens_per_s']:.2f}x real tokens/s, "
                         f"{base['train_s'] / ours['train_s']:.2f}x less training time, "
                         f"val loss {ours['final_val_loss']:.4f} vs {base['final_val_loss']:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(prog="python -m bench.train_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None,
                        help="comma list of embedded,1b,3b (default: 1b,3b on CUDA, embedded on CPU)")
    parser.add_argument("--records", type=int, default=None, help="use the first N records (default: all)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    parser.add_argument("--only", choices=["ours", "baseline"], default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    models = (args.model or ("1b,3b" if torch.cuda.is_available() else "embedded")).split(",")
    unknown = [m for m in models if m not in ("embedded", *GPU_MODELS)]
    if unknown:
        print(f"--model: unknown {unknown}; choose from embedded, 1b, 3b", file=sys.stderr)
        return 2
    if any(m in GPU_MODELS for m in models) and not torch.cuda.is_available():
        print("--model 1b/3b needs a CUDA GPU (on CPU the benchmark uses the embedded default)", file=sys.stderr)
        return 2
    variants = [args.only] if args.only else ["ours", "baseline"]
    ctx = mp.get_context("spawn")
    results = []
    for model in models:
        for variant in variants:
            queue = ctx.Queue()
            proc = ctx.Process(target=run_variant, args=(variant, model, args.records, args.epochs, args.threads, queue))
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
