"""package stage: merge the adapter into the base weights, prove the merge, write a servable model.

    python -m stages.package --adapter models/adapter --data data/processed --output models/merged \
        --metrics metrics/package.json --eval-metrics metrics/eval.json --train-metrics metrics/train.json

1. Load the base model in 16-bit (bf16 for a real Llama; fp32 for the embedded model; never 4-bit:
   a QLoRA adapter is applied to the base reloaded in 16-bit) with the adapter from models/adapter.
2. Answer `package.check_prompts` prompts from the test split greedily and record the logits that
   decided every answer token (teacher-forced on those answers).
3. Merge the adapter into the weights (peft merge_and_unload), save, reload the saved model from
   disk and do the same: the greedy tokens must be identical and the largest logit difference,
   relative to the largest logit, within `package.logits_tolerance`; otherwise the stage fails and
   writes nothing.
4. models/merged/: model.safetensors + config.json, tokenizer with the Llama 3 chat template,
   generation_config.json (stops on <|eot_id|> and <|end_of_text|>, pads with
   <|finetune_right_pad_id|>), serving.json (default system prompt for the endpoint), model_card.md
   and card.json (merge check, metrics, data hash, params, git commit, dvc.lock hashes).
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import time
from pathlib import Path

import torch

from .core import cli
from .core.chat import BEGIN_OF_TEXT_ID, ChatFormatError, chat_format
from .core.determinism import fix_cpu_threads
from .core.generate import generate_batch
from .core.io import atomic_dir, read_json, read_jsonl, write_json, write_text_atomic
from .core.modeling import EMBEDDED, count_parameters, load_tuned_model, resolve_device
from .core.params import ConfigError, CpuParams, DecodingParams, ModelParams, PackageParams, load_params
from .core.perf import write_perf
from .core.progress import progress, quiet_library_bars

STAGE = "package"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Used for the merge check only when no processed split exists (e.g. packaging an adapter by hand).
FALLBACK_PROMPTS = [
    ("You are a helpful corporate assistant.", "How do I submit an expense report?"),
    ("You are a helpful corporate assistant.", "What is the PM job code?"),
    ("You are a helpful corporate assistant.", "Who approves annual leave?"),
    ("", "How do I reset my password?"),
]


class MergeCheckError(Exception):
    """The merged model does not reproduce the adapter model."""


def log(message: str) -> None:
    print(f"[{STAGE}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def read_manifest(adapter_dir: Path) -> dict:
    path = adapter_dir / "manifest.json"
    manifest = read_json(path, missing=": --adapter must be a train stage output (dvc repro train)")
    missing = [key for key in ("method", "params") if key not in manifest]
    if missing:
        raise ConfigError(f"{path} lacks {', '.join(missing)}")
    if manifest["method"] not in ("lora", "qlora", "full"):
        raise ConfigError(f"{path}: unknown method {manifest['method']!r} (lora, qlora or full)")
    weights = adapter_dir / ("model" if manifest["method"] == "full" else "adapter")
    if not weights.is_dir():
        raise ConfigError(f"{weights} not found (manifest says method {manifest['method']})")
    return manifest


def check_prompts(data_dir: Path | None, count: int) -> tuple[list[tuple[str, str]], str]:
    """(system, instruction) pairs for the merge check: test split first, then val, then built-in."""
    for name in ("test.jsonl", "val.jsonl", "train.jsonl"):
        path = data_dir / name if data_dir else None
        if path and path.is_file():
            rows = [row for row in read_jsonl(path) if row.get("instruction")]
            if rows:
                return [(row.get("system", ""), row["instruction"]) for row in rows[:count]], str(path)
    return FALLBACK_PROMPTS[:count], "built-in prompts"


def training_system_prompt(data_dir: Path | None) -> str:
    """The system prompt most used in training: the endpoint's default when a request gives none."""
    path = data_dir / "train.jsonl" if data_dir else None
    if not path or not path.is_file():
        return ""
    counts = collections.Counter(row.get("system", "") for row in read_jsonl(path))
    return counts.most_common(1)[0][0] if counts else ""


def save_dtype(choice: str, model: ModelParams) -> torch.dtype:
    if choice == "auto":
        return torch.float32 if model.base == EMBEDDED else torch.bfloat16
    return DTYPES[choice]


# ---------------------------------------------------------------------------------------------
# The merge check
# ---------------------------------------------------------------------------------------------

@torch.inference_mode()
def answer_and_logits(model, prompts: list[list[int]], max_new_tokens: int, fmt,
                      reference: list[list[int]] | None = None,
                      desc: str = "merge check", guard: dict | None = None) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy answers, and the logits at the positions that chose each token of `reference`
    (the model's own answers when None), on the CPU in fp32. A progress bar counts steps: each
    decoding step of the batch, then each prompt's teacher-forced pass."""
    with progress(desc, total=max_new_tokens + len(prompts), unit="step") as bar:
        done = [0]

        def on_step(step: int) -> None:
            bar.update(step - done[0], phase="greedy answers")
            done[0] = step

        answers = [g.token_ids for g in generate_batch(model, prompts, max_new_tokens, fmt, temperature=0.0,
                                                       on_step=on_step, **(guard or {}))]
        bar.update(max_new_tokens - done[0], phase="teacher-forced logits")  # every row stopped early
        follow = reference if reference is not None else answers
        device = next(model.parameters()).device
        logits = []
        for prompt, answer in zip(prompts, follow):
            ids = torch.tensor([prompt + answer], dtype=torch.long, device=device)
            # Only the positions that chose the answer's tokens (and the one after it) reach the LM head.
            out = model(input_ids=ids, logits_to_keep=len(answer) + 1).logits[0]
            logits.append(out.float().cpu())
            bar.update(1)
    return answers, logits


def compare(ref_answers, ref_logits, answers, logits, tolerance: float, require_identical: bool = True) -> dict:
    identical = sum(a == b for a, b in zip(ref_answers, answers))
    max_diff = max(float((a - b).abs().max()) for a, b in zip(ref_logits, logits))
    scale = max(float(a.abs().max()) for a in ref_logits)
    relative = max_diff / scale if scale > 0 else max_diff
    return {
        "prompts": len(ref_answers), "greedy_identical": identical,
        "greedy_tokens_identical": identical == len(ref_answers),
        "max_abs_logit_diff": max_diff, "max_abs_logit": scale, "relative_logit_diff": relative,
        "logits_tolerance": tolerance, "logits_within_tolerance": relative <= tolerance,
        "require_identical": require_identical,
        "passed": (identical == len(ref_answers) or not require_identical) and relative <= tolerance,
    }


# ---------------------------------------------------------------------------------------------
# Card
# ---------------------------------------------------------------------------------------------

def read_metrics(path: Path | None) -> dict | None:
    if path and path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return {"error": f"{path} is not valid JSON"}
    return None


def versions() -> dict:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_card(card: dict) -> str:
    model, check, serving = card["model"], card["merge_check"], card["serving"]
    fmt = serving["chat_format"]
    base = card.get("base_model") or {}
    lines = [
        f"# {card['name']}", "",
        f"Chat model fine-tuned with **{model['method']}** on `{model['base']}` and merged into "
        f"{model['dtype']} weights ({model['parameters']:,} parameters).", "",
        "## Use", "",
        f"Prompt format: `{fmt['format']}`, the chat template saved with the tokenizer; the assistant turn ends with "
        f"`{fmt['eot']}`, generation stops on {', '.join(f'`{t}`' for t in fmt['stop'])}, padding uses "
        f"`{fmt['pad']}`. Serve it with `serve/score.py` (see docs/serving.md):", "",
        "```", "python -m stages.deploy serve    # azmlinfsrv on 127.0.0.1, POST /score", "```", "",
        f"Default system prompt (when a request gives none): \"{serving['default_system']}\"", "",
        "## Base model", "",
        *[f"- {k}: `{v}`" for k, v in base.items()], "",
        "## Merge check", "",
        f"{check['prompts']} prompts ({check['source']}), up to {check['max_new_tokens']} new tokens each, teacher-forced "
        "on the adapter model's greedy answers:", "",
        "| check | greedy answers identical | relative logit difference | tolerance | passed |", "|---|---|---|---|---|",
    ]
    for label, part in (("adapter vs merged, fp32", check["merge"]),
                        (f"merged fp32 vs saved {check['saved_dtype']}, reloaded"
                         + (", computed in fp32" if check.get("saved_check_dtype") == "float32"
                            and check["saved_dtype"] != "float32" else ""), check["saved"])):
        lines.append(f"| {label} | {part['greedy_identical']}/{part['prompts']} | {_fmt(part['relative_logit_diff'])} | "
                     f"{_fmt(part['logits_tolerance'])} | {part['passed']} |")
    lines.append("")
    evaluation = card["metrics"].get("eval")
    if evaluation:
        lines += ["## Evaluation (metrics/eval.json)", ""]
        base_m, tuned = evaluation.get("base") or {}, evaluation.get("tuned") or {}
        keys = [k for k in tuned if isinstance(tuned.get(k), (int, float)) and not isinstance(tuned.get(k), bool)]
        if keys:
            lines += ["| metric | base | tuned |", "|---|---|---|"]
            lines += [f"| {k} | {_fmt(base_m.get(k, '-'))} | {_fmt(tuned[k])} |" for k in keys]
        gate = evaluation.get("gate")
        if gate:
            lines += ["", f"Gate passed: {gate.get('passed')}" +
                      (f" ({'; '.join(gate.get('reasons') or [])})" if gate.get("reasons") else "")]
        lines.append("")
    else:
        lines += ["## Evaluation", "", "metrics/eval.json was not available when this model was packaged.", ""]
    train = card["metrics"].get("train")
    if train:
        lines += ["## Training (metrics/train.json)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in train.items() if isinstance(v, (int, float, str, bool))]
        lines.append("")
    lines += ["## Provenance", "",
              f"- data hash: `{card['data_hash']}`",
              f"- versions: {', '.join(f'{k} {v}' for k, v in card['versions'].items())}",
              "- code and data: the dvc.lock of the commit that produced this model (`dvc.lock` hashes every "
              "dependency; the card holds no clock or git state, so its bytes depend on the inputs alone)",
              "", "Training parameters: see card.json (`params`).", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

def package(adapter_dir: str | Path, output: str | Path, package_params: PackageParams = PackageParams(),
            data_dir: str | Path | None = None, eval_metrics: str | Path | None = None,
            train_metrics: str | Path | None = None, device: str = "auto",
            decoding: DecodingParams = DecodingParams(), base_model: str | Path | None = None) -> dict:
    """Merge, check, save to `output` (atomically). Returns the card; raises MergeCheckError.
    `base_model`: the base stage's folder to read the adapter's base model from."""
    started = time.perf_counter()
    adapter_dir, output = Path(adapter_dir), Path(output)
    data_dir = Path(data_dir) if data_dir else None
    manifest = read_manifest(adapter_dir)
    method = manifest["method"]
    model_params = ModelParams.model_validate(manifest["params"].get("model", {}))
    cli.use_base_model(base_model, model_params)  # the base the adapter was trained on, from models/base
    dtype = save_dtype(package_params.dtype, model_params)
    torch_device = resolve_device(device)
    threads = torch.get_num_threads()
    # The merge check's logits on a CPU depend on the thread count (on AMD CPUs): run the count the
    # adapter was trained with (its manifest's cpu.threads), so the same adapter gives the same bytes.
    fix_cpu_threads(CpuParams.model_validate(manifest["params"].get("cpu", {})).threads, torch_device)
    try:
        return _package(adapter_dir, output, package_params, data_dir, eval_metrics, train_metrics,
                        manifest, method, model_params, dtype, torch_device, started, decoding)
    finally:
        torch.set_num_threads(threads)


def _package(adapter_dir, output, package_params, data_dir, eval_metrics, train_metrics,
             manifest, method, model_params, dtype, torch_device, started, decoding) -> dict:

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir / "tokenizer"))
    try:
        fmt = chat_format(tokenizer)
    except ChatFormatError as exc:
        raise ConfigError(f"{adapter_dir / 'tokenizer'}: {exc}") from None
    fmt.prepare_tokenizer()

    pairs, source = check_prompts(data_dir, package_params.check_prompts)
    prompts = [fmt.prompt_ids(system, instruction) for system, instruction in pairs]
    max_new = package_params.check_max_new_tokens
    guard = decoding.guard()  # the merge check decodes as evaluate and the endpoint do

    # 1. The merge itself, in fp32: adapter model vs merged model. Rounding cannot hide a wrong merge
    #    here (scale, target module), so the tolerance is tight. For QLoRA the base is *not* quantized
    #    here, so the merge lands in full-precision weights.
    tuned = load_tuned_model(model_params, adapter_dir, method, dtype=torch.float32, device=torch_device,
                             tokenizer=tokenizer)
    tuned.eval()
    ref_answers, ref_logits = answer_and_logits(tuned, prompts, max_new, fmt, desc="merge check 1/3: adapter model",
                                                guard=guard)
    merged = tuned.merge_and_unload() if method != "full" else tuned
    answers, logits = answer_and_logits(merged, prompts, max_new, fmt, ref_answers,
                                        desc="merge check 2/3: merged model", guard=guard)
    merge = compare(ref_answers, ref_logits, answers, logits, package_params.logits_tolerance)
    log(f"merge check (fp32): {merge['greedy_identical']}/{merge['prompts']} greedy answers identical, relative "
        f"logit diff {merge['relative_logit_diff']:.3g} (tolerance {merge['logits_tolerance']:g})")
    if not merge["passed"]:
        raise MergeCheckError("the merged model does not reproduce the adapter model: " + "; ".join(
            _problems(merge, "package.logits_tolerance")))

    merged = merged.to(dtype)
    merged.config.pad_token_id = fmt.pad_id
    merged.config.eos_token_id = list(fmt.stop_ids)
    # The answer length the model was evaluated with (decoding.max_new_tokens, resolved by evaluate):
    # the endpoint's default (serve.max_new_tokens_default: auto) and generation_config's, so a model
    # evaluated at 300 tokens is not served at 64. The repetition guard goes with it.
    evaluated_budget = ((read_metrics(Path(eval_metrics) if eval_metrics else None) or {})
                        .get("answer_budget") or {}).get("max_new_tokens")
    generation_config = serving_generation_config(merged, fmt, evaluated_budget, guard)
    merged.generation_config = generation_config
    parameters = count_parameters(merged)[1]

    with atomic_dir(output) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del merged, tuned
        # 2. The saved model, reloaded from disk in its saved dtype, against the fp32 merge: this
        #    catches what saving can break (missing or misnamed tensors, untied heads) with a tolerance
        #    that suits the saved dtype's rounding; greedy answers may differ where two tokens are
        #    within rounding of each other, so they are reported, not required.
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=dtype).to(torch_device)
        # On a CPU the saved 16-bit weights are upcast to fp32 for this check (exactly: every bf16/fp16
        # value is an fp32 value). What the check is for, the saved tensors and their rounding, is the
        # same; CPU 16-bit kernels are neither what the GPU endpoint runs nor fast (SmolLM2: 9 s in
        # bf16, about 4 s this way, on 2 cores).
        computed = torch.float32 if torch_device.type == "cpu" else dtype
        reloaded = reloaded.to(computed).eval()
        how = str(dtype).removeprefix("torch.") + ("" if computed == dtype else ", computed in fp32")
        answers, logits = answer_and_logits(reloaded, prompts, max_new, fmt, ref_answers,
                                            desc=f"merge check 3/3: saved model ({how})", guard=guard)
        del reloaded
        tolerance = package_params.logits_tolerance if dtype == torch.float32 else package_params.saved_logits_tolerance
        saved = compare(ref_answers, ref_logits, answers, logits, tolerance,
                        require_identical=dtype == torch.float32)
        log(f"saved-model check ({how}): {saved['greedy_identical']}/{saved['prompts']} "
            f"greedy answers identical, relative logit diff {saved['relative_logit_diff']:.3g} "
            f"(tolerance {saved['logits_tolerance']:g})")
        if not saved["passed"]:
            setting = "package.logits_tolerance" if dtype == torch.float32 else "package.saved_logits_tolerance"
            raise MergeCheckError("the saved model does not reproduce the merged model: " + "; ".join(
                _problems(saved, setting)))
        result = {"merge": merge, "saved": saved, "passed": True, "source": source, "max_new_tokens": max_new,
                  "prompts": merge["prompts"], "saved_dtype": str(dtype).removeprefix("torch."),
                  "saved_check_dtype": str(computed).removeprefix("torch.")}

        serving = {"default_system": training_system_prompt(data_dir), "chat_format": fmt.describe(),
                   "stop_token_ids": list(fmt.stop_ids), "pad_token_id": fmt.pad_id,
                   "max_new_tokens": evaluated_budget, "repetition_guard": guard}
        write_json(tmp / "serving.json", serving)
        # Every byte of the card is a function of the stage's inputs (no clock, no git state), so
        # the same adapter and data package to the same models/merged hash on every machine.
        card = {
            "name": f"{Path(model_params.base).name if model_params.base != EMBEDDED else 'embedded-llama'}-{method}-merged",
            "model": {"base": model_params.base, "tokenizer": model_params.tokenizer, "method": method,
                      "dtype": str(dtype).removeprefix("torch."), "parameters": parameters,
                      "max_seq_length": model_params.max_seq_length},
            "base_model": manifest.get("base_model") or {"source": model_params.base},
            "merge_check": result,
            "metrics": {"eval": read_metrics(Path(eval_metrics) if eval_metrics else None),
                        "train": read_metrics(Path(train_metrics) if train_metrics else None)},
            "data_hash": manifest.get("data_hash"),
            "params": manifest["params"],
            "package_params": package_params.model_dump(),
            "versions": versions(),
            "training_versions": manifest.get("versions"),
            "serving": serving,
        }
        write_json(tmp / "card.json", card)
        write_text_atomic(tmp / "model_card.md", render_card(card))
    card["seconds"] = round(time.perf_counter() - started, 2)
    return card


def _problems(check: dict, setting: str) -> list[str]:
    problems = []
    if check["require_identical"] and not check["greedy_tokens_identical"]:
        problems.append(f"only {check['greedy_identical']} of {check['prompts']} greedy answers are token-identical")
    if not check["logits_within_tolerance"]:
        problems.append(f"relative logit difference {check['relative_logit_diff']:.3g} exceeds "
                        f"{setting} {check['logits_tolerance']:g}")
    return problems


def serving_generation_config(model, fmt, max_new_tokens: int | None = None, guard: dict | None = None):
    from transformers import GenerationConfig

    bos = getattr(model.config, "bos_token_id", None)
    if isinstance(bos, list):
        bos = bos[0] if bos else None
    return GenerationConfig(bos_token_id=bos if bos is not None else BEGIN_OF_TEXT_ID,
                            eos_token_id=list(fmt.stop_ids), pad_token_id=fmt.pad_id, do_sample=False,
                            **({"max_new_tokens": int(max_new_tokens)} if max_new_tokens else {}), **(guard or {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.package", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", default="models/adapter")
    parser.add_argument("--data", default="data/processed", help="processed splits (merge-check prompts)")
    parser.add_argument("--output", default="models/merged")
    parser.add_argument("--metrics", default="metrics/package.json")
    parser.add_argument("--eval-metrics", default="metrics/eval.json")
    parser.add_argument("--train-metrics", default="metrics/train.json")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base-model", default="", help=cli.BASE_MODEL_HELP)
    args = parser.parse_args(argv)

    def work():
        params = load_params(args.params)
        quiet_library_bars()
        card = package(args.adapter, args.output, params.package, data_dir=args.data,
                       eval_metrics=args.eval_metrics, train_metrics=args.train_metrics, decoding=params.decoding,
                       base_model=args.base_model)
        write_json(args.metrics, {"merge_check": card["merge_check"], "parameters": card["model"]["parameters"],
                                  "dtype": card["model"]["dtype"]})
        write_perf(STAGE, {"seconds": card["seconds"]})
        log(f"wrote {args.output} ({card['model']['parameters']:,} parameters, {card['model']['dtype']}) "
            f"in {card['seconds']} s")

    try:
        return cli.run(work, STAGE)
    except MergeCheckError as exc:
        print(f"[{STAGE}] merge check failed: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
