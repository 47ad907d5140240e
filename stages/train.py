"""train stage: LoRA / QLoRA / full fine-tuning of a Llama 3.x model on the processed splits.

    python -m stages.train --data data/processed --output models/adapter \
        --checkpoints models/checkpoints --metrics metrics/train.json --live dvclive/train

Under `torchrun --nproc_per_node N -m stages.train ...` the same command trains with DDP (FSDP for
full fine-tuning); only process 0 writes outputs. See docs/training.md.

Outputs (written to a temporary directory, then renamed): models/adapter/{adapter|model, tokenizer,
manifest.json}, metrics/train.json, dvclive/train (loss curves), models/checkpoints (resumable).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from .core import cli
from .core.chat import chat_format
from .core.determinism import computed_on, fix_cpu_threads, pin_cpu_isa
from .core.io import atomic_dir, write_json
from .core.modeling import (EmbeddedSource, base_source, check_model_fits, check_modules_to_save, count_parameters,
                            load_base_model, load_model_tokenizer, lora_config, resolve_device, resolve_dtype)
from .core.params import ConfigError, Params, load_params
from .core.perf import write_perf
from .core.records import DataError, Problem, content_hash, jsonl_lines
from .core.schedule import training_length
from .core.training import (DistInfo, TrainingError, check_method, fit, init_distributed, memory_snapshot,
                            TRAINING_LIBRARIES, identity_key, library_versions, oom_message, package_available,
                            release_memory, run_identity, seed_everything, select_backend, select_compile,
                            select_distributed, select_loss_head, trainable_state, uses_shared_prefix,
                            with_token_budget, most_labelled_positions)

STAGE = "train"
SPLIT_FIELDS = ("system", "instruction", "output")


def log(message: str) -> None:
    print(f"[{STAGE}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def read_split(path: Path) -> list[dict]:
    """The rows of a processed split; every bad line is reported, with its line number."""
    if not path.is_file():
        raise DataError(f"{path} not found (run the preprocess stage: dvc repro preprocess)")
    rows, problems = [], []
    for number, line in enumerate(jsonl_lines(path.read_text(encoding="utf-8-sig")), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(str(path), number, f"malformed JSON: {exc.msg}"))
            continue
        bad = [f for f in SPLIT_FIELDS if not isinstance(row.get(f), str) or (f != "system" and not row[f].strip())]
        if bad:
            problems.append(Problem(str(path), number, f"missing or empty string field(s): {', '.join(bad)}"))
            continue
        rows.append(row)
    if problems:
        raise DataError(f"{len(problems)} bad line(s) in {path}", problems)
    return rows


def encode_rows(tokenizer, rows: list[dict], completion_only: bool, max_seq_length: int, source: str):
    examples, problems = [], []
    fmt = chat_format(tokenizer)
    for number, row in enumerate(rows, start=1):
        example = fmt.encode(row["system"], row["instruction"], row["output"], completion_only)
        if len(example.input_ids) > max_seq_length:
            problems.append(Problem(source, number, f"{len(example.input_ids)} tokens > model.max_seq_length "
                                                    f"{max_seq_length} (preprocess drops these; re-run it)"))
        examples.append(example)
    if problems:
        raise DataError(f"{len(problems)} record(s) too long in {source}", problems)
    return examples


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def quantization_config(train):
    from transformers import BitsAndBytesConfig

    q = train.quantization
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                              bnb_4bit_use_double_quant=q.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype))


def _model_path(params: Params, dtype) -> str:
    """A folder or hub id for loaders that need one (unsloth, 4-bit): the seeded embedded model is
    saved to a temporary folder, a packaged model is its converted folder."""
    source = base_source(params.model)
    if not isinstance(source, EmbeddedSource):
        return source.model_path()
    directory = tempfile.mkdtemp(prefix="embedded-llama-")
    load_base_model(params.model, dtype=dtype, device="cpu").save_pretrained(directory)
    return directory


def keep_compute_dtype(model, dtype) -> None:
    """Undo the fp32 upcast of peft's prepare_model_for_kbit_training for this loop. It casts every
    parameter that is not 4-bit (the embeddings, the tied head, the norms) to fp32, for training
    under autocast (the Trainer's bf16=True). This loop runs without autocast, so an fp32 embedding
    would carry fp32 activations through every layer: attention off its bf16 kernels, twice the
    activation memory, and a QLoRA run measured against bf16 LoRA on different arithmetic (issue 22's
    QLoRA figures). Back to the compute dtype, as a LoRA run keeps them; a no-op in fp32."""
    if dtype == torch.float32:
        return
    for param in model.parameters():
        if param.dtype == torch.float32 and type(param).__name__ != "Params4bit":
            param.data = param.data.to(dtype)


def build_model_hf(params: Params, device, dtype, tokenizer=None):
    train = params.train
    quant = None
    model_params = params.model
    if train.method == "qlora":
        quant = quantization_config(train)
        model_params = model_params.model_copy(update={"base": _model_path(params, dtype)})
    model = load_base_model(model_params, dtype=dtype, device=device, quantization_config=quant, tokenizer=tokenizer)
    if getattr(model.config, "_attn_implementation", None) != train.attention:
        try:
            model.set_attn_implementation(train.attention)
        except (ValueError, ImportError) as exc:
            raise ConfigError(f"train.attention: {train.attention} is not usable here: {exc}") from None
    model.config.use_cache = False
    if train.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=train.gradient_checkpointing)
        keep_compute_dtype(model, dtype)
    elif train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    # LoRA's initialisation draws from this seed alone, whatever loading the base model drew (building the
    # embedded model draws from its own seed; loading a folder draws nothing).
    torch.manual_seed(train.seed)
    model = get_peft_model(model, lora_config(train))
    check_modules_to_save(model, train.lora.modules_to_save)
    return model


def build_model_unsloth(params: Params, dtype):  # pragma: no cover - needs CUDA + unsloth
    from unsloth import FastLanguageModel

    train = params.train
    name = _model_path(params, dtype)
    model, _ = FastLanguageModel.from_pretrained(
        model_name=name, max_seq_length=params.model.max_seq_length, dtype=dtype,
        load_in_4bit=train.method == "qlora", full_finetuning=train.method == "full",
        token=os.environ.get("HF_TOKEN"))
    if train.method == "full":
        return model
    targets = train.lora.target_modules
    if targets == "all-linear":
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return FastLanguageModel.get_peft_model(
        model, r=train.lora.r, lora_alpha=train.lora.alpha, lora_dropout=train.lora.dropout,
        target_modules=targets, modules_to_save=train.lora.modules_to_save or None, bias="none",
        use_gradient_checkpointing="unsloth" if train.gradient_checkpointing else False,
        random_state=train.seed)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

def versions() -> dict:
    return library_versions(TRAINING_LIBRARIES + ("dvclive",))


def save_outputs(output: Path, model, tokenizer, params: Params, data_hash: str, extra: dict,
                 state_dict: dict | None = None) -> None:
    """models/adapter/{adapter|model, tokenizer, manifest.json}, atomically. state_dict: the full
    weights gathered from FSDP shards (the model's own parameters are shards then)."""
    with atomic_dir(output) as tmp:
        inner = getattr(model, "module", model)
        if params.train.method == "full":
            inner.save_pretrained(tmp / "model", safe_serialization=True, state_dict=state_dict)
        else:
            inner.save_pretrained(tmp / "adapter", state_dict=state_dict)
            canonical_adapter_config(tmp / "adapter" / "adapter_config.json")
        fmt = chat_format(tokenizer)
        fmt.prepare_tokenizer()
        tokenizer.save_pretrained(tmp / "tokenizer")
        write_json(tmp / "manifest.json", {
            "method": params.train.method, "params": params.model_dump(mode="json"), "data_hash": data_hash,
            "base_model": base_source(params.model).provenance(), "chat_format": fmt.describe(),
            "versions": versions(), "cpu_kernels": pin_cpu_isa(), **extra,
        })


def canonical_adapter_config(path: Path) -> None:
    """peft writes target_modules from a set, in an order that changes from run to run; sorted lists
    and keys make the file (and models/adapter's hash in dvc.lock) a function of the params alone."""
    config = json.loads(path.read_text(encoding="utf-8"))
    for key, value in config.items():
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            config[key] = sorted(value)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def open_live(directory: str | None, resume: bool):
    if not directory:
        return None
    from dvclive import Live

    # dvcyaml=False: the plots are declared in our dvc.yaml; dvclive must not write its own.
    return Live(dir=directory, dvcyaml=False, save_dvc_exp=False, resume=False, report=None)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

def run_training(params: Params, data_dir: Path, output: Path, checkpoints: Path | None, metrics_path: Path | None,
                 live_dir: str | None, stop_after_steps: int | None = None, perf_dir: str | Path | None = None) -> dict:
    started = time.perf_counter()
    train = params.train
    device = resolve_device()
    fix_cpu_threads(params.cpu.threads, device)
    cuda = device.type == "cuda"
    check_method(train.method, cuda, package_available("bitsandbytes"))
    backend = select_backend(train.backend, train.allow_backend_fallback, cuda, package_available("unsloth"))
    head = select_loss_head(train.fused_loss, cuda, package_available("liger_kernel"))
    dtype = resolve_dtype(train.precision, device)
    dist_info = init_distributed(device)
    device = dist_info.device
    distributed = select_distributed(train.distributed, train.method, dist_info.world_size)
    compiled = select_compile(train.compile, backend.value, distributed, cuda)
    say = log if dist_info.is_main else (lambda _m: None)
    for note in (backend.note, head.note, compiled.note):
        if note:
            say(note)

    train_rows = read_split(data_dir / "train.jsonl")
    val_rows = read_split(data_dir / "val.jsonl") if (data_dir / "val.jsonl").is_file() else []
    if not train_rows:
        raise DataError(f"{data_dir / 'train.jsonl'} has no records: the preprocess stage kept none for "
                        "training (its counts: metrics/preprocess.json)")
    data_hash = content_hash([{k: r[k] for k in SPLIT_FIELDS} for r in train_rows + val_rows])
    tokenizer = load_model_tokenizer(params.model)
    check_model_fits(params.model, tokenizer)
    train_ex = encode_rows(tokenizer, train_rows, train.completion_only_loss, params.model.max_seq_length,
                           str(data_dir / "train.jsonl"))
    val_ex = encode_rows(tokenizer, val_rows, True, params.model.max_seq_length, str(data_dir / "val.jsonl"))

    if train.tokens_per_step > 0:  # steps sized in tokens (GPU): records per step follow from the data
        set_for = train.learning_rate
        train = with_token_budget(train, train_ex)
        lr = (f"; learning_rate {set_for:g} -> {train.learning_rate:g} (lr_scaling {train.lr_scaling})"
              if train.learning_rate != set_for else "")
        say(f"tokens_per_step {train.tokens_per_step}: {train.batch_size * train.gradient_accumulation_steps} "
            f"records per optimizer step at the training split's mean record length{lr}")
    length = training_length(len(train_ex), train.batch_size * train.gradient_accumulation_steps, train.epochs,
                             train.min_steps, dist_info.world_size)
    train = train.model_copy(update={"epochs": length.epochs})
    say(length.describe())

    seed_everything(train.seed)
    if backend.value == "unsloth":  # pragma: no cover - needs CUDA
        model = build_model_unsloth(params, dtype)
    else:
        model = build_model_hf(params, device, dtype, tokenizer)
    if cuda and train.fused_loss == "auto":  # pragma: no cover - needs CUDA
        # The memory rule needs the largest micro-batch's labelled positions, counted over this run's
        # steps as fit() will split them, and the vocabulary.
        labelled = most_labelled_positions(train_ex, train, uses_shared_prefix(train, backend.value),
                                           dist_info.world_size)
        head = select_loss_head(train.fused_loss, cuda, package_available("liger_kernel"),
                                labelled_positions=labelled, vocab_size=int(model.config.vocab_size),
                                budget_mb=train.fused_loss_budget_mb)
        if head.note:
            say(head.note)
    trainable, total = count_parameters(model)
    say(f"{params.model.base} {train.method} on {device} ({dtype}), backend {backend.value}, loss head "
        f"{head.value}, packing {train.packing}, {distributed if distributed != 'none' else 'single process'}; "
        f"{trainable:,} of {total:,} parameters trainable; {len(train_ex)} train / {len(val_ex)} val records")

    identity = run_identity(params.model_dump(mode="json"), data_hash, dist_info.world_size)
    live = open_live(live_dir, resume=False) if dist_info.is_main else None
    try:
        result = fit(model, train_ex, val_ex, train, device=device, head_mode=head.value,
                     checkpoint_dir=checkpoints, run_key=identity_key(identity), run_identity=identity,
                     logger=live, dist_info=dist_info, distributed=distributed, log=say,
                     stop_after_steps=stop_after_steps, pad_id=chat_format(tokenizer).pad_id,
                     shared_prefix=uses_shared_prefix(train, backend.value))
    except torch.cuda.OutOfMemoryError:  # pragma: no cover - needs CUDA
        release_memory(device)
        raise TrainingError(oom_message(train, device, "training")) from None
    finally:
        if live is not None:
            live.end()
    release_memory(device)
    wall = time.perf_counter() - started
    world = dist_info.world_size
    memory = memory_snapshot(device)
    metrics = {
        "method": train.method, "backend": backend.value, "loss_head": head.value, "compile": compiled.value,
        "packing": train.packing,
        "device": device.type, "processes": world,
        "final_train_loss": _r(result.final_train_loss), "final_val_loss": _r(result.final_val_loss),
        "best_val_loss": _r(result.best_val_loss), "best_step": result.best_step,
        "final_val_perplexity": _r(math.exp(min(result.final_val_loss, 50))) if result.final_val_loss else None,
        "steps": result.steps, "epochs_planned": length.epochs, "epochs_run": result.epochs_run,
        "early_stopped": result.early_stopped, "resumed_from_step": result.resumed_from_step,
        "real_tokens": result.real_tokens * world,
        "trainable_params": trainable, "total_params": total,
        # The CPU kind (vendor, instruction set, threads) or GPU the bytes depend on (determinism.py):
        # `make pipeline` names it when a run on another kind rewrites the committed outputs.
        "computed_on": computed_on(device),
    }
    # Machine- and load-dependent figures: logs/perf/train.json, not metrics/ (stages/core/perf.py).
    perf = {
        "wall_time_s": round(wall, 2), "train_time_s": round(result.train_seconds, 2),
        "eval_time_s": round(result.eval_seconds, 2), "real_tokens": result.real_tokens * world,
        "real_tokens_per_s": round(result.real_tokens * world / max(result.train_seconds, 1e-9), 1),
        "peak_rss_mb": memory["rss_peak_mb"], "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_kernels": pin_cpu_isa(),
    }
    if cuda:
        perf["cuda_max_allocated_mb"] = memory["cuda_max_allocated_mb"]
        perf["cuda_max_reserved_mb"] = memory["cuda_max_reserved_mb"]
    # Under FSDP each process holds shards: gather the full weights (every process takes part).
    full_state = trainable_state(model) if distributed == "fsdp" else None
    if dist_info.is_main:
        save_outputs(output, model, tokenizer, params, data_hash,
                     {"train_records": len(train_ex), "val_records": len(val_ex), "best_step": result.best_step,
                      "steps": result.steps, "early_stopped": result.early_stopped,
                      "length_rule": length.describe(),
                      "validation": validation_record(result, val_rows, dtype, train.method)},
                     state_dict=full_state)
        if metrics_path is not None:
            write_json(metrics_path, metrics)
        write_perf(STAGE, perf, perf_dir)
        say(f"done in {wall:.1f} s: best val loss {metrics['best_val_loss']}, "
            f"{perf['real_tokens_per_s']:,} real tokens/s; wrote {output}")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return {**metrics, "perf": perf}


def validation_record(result, val_rows: list[dict], dtype: torch.dtype, method: str) -> dict | None:
    """The saved weights' validation loss, with what it was measured on. The weights saved are the best
    evaluation's (fit restores them), so best_val_loss is their loss: the evaluate stage reuses it
    instead of computing it again when its own model, split and dtype are these
    (stages.evaluate.reusable_val_loss)."""
    if result.best_val_loss is None or not val_rows or result.final_val_loss is None:
        return None  # no val split: best_val_loss is a training loss then
    return {"loss": result.best_val_loss, "step": result.best_step, "records": len(val_rows),
            "split_hash": content_hash(val_rows), "dtype": str(dtype).removeprefix("torch."), "method": method,
            "definition": "mean completion-token cross-entropy, completion-only labels"}


def _r(value):
    return None if value is None else round(float(value), 6)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.train", description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/processed", help="folder with train.jsonl and val.jsonl")
    parser.add_argument("--output", default="models/adapter")
    parser.add_argument("--checkpoints", default="models/checkpoints", help="resumable checkpoints ('' = none)")
    parser.add_argument("--metrics", default="metrics/train.json")
    parser.add_argument("--live", default="dvclive/train", help="dvclive folder ('' = no curves)")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base-model", default="", help=cli.BASE_MODEL_HELP)
    args = parser.parse_args(argv)

    def body() -> int:
        params = load_params(args.params)
        cli.use_base_model(args.base_model, params.model)
        run_training(params, Path(args.data), Path(args.output),
                     Path(args.checkpoints) if args.checkpoints else None,
                     Path(args.metrics) if args.metrics else None, args.live or None)
        return 0

    def guarded() -> int:
        try:
            with terminate_as_interrupt():
                return body()
        except TrainingError as exc:
            print(f"[{STAGE}] training failed: {exc}", file=sys.stderr)
            return 3
        except KeyboardInterrupt as exc:
            how = "stopped by SIGTERM" if isinstance(exc, Terminated) else "interrupted"
            print(f"[{STAGE}] {how}; re-run the same command to resume from the last checkpoint "
                  f"({args.checkpoints or 'none: --checkpoints is empty'})", file=sys.stderr)
            return 128 + signal.SIGTERM if isinstance(exc, Terminated) else 130

    return cli.run(guarded, STAGE)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what Azure ML, Kubernetes and `kill` send), handled like Ctrl-C."""


@contextlib.contextmanager
def terminate_as_interrupt():
    """While the block runs, SIGTERM raises Terminated, so it unwinds like Ctrl-C: the checkpoint
    write in progress is discarded and the last complete checkpoint is what a re-run resumes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
