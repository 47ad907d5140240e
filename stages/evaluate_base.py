"""evaluate_base stage: the base model's answers, scores and validation loss, once per base model.

    python -m stages.evaluate_base --data data/processed --output reports/eval_base

The base model's evaluation depends only on the base model (params `model`, and `cpu` threads), the
test and validation splits, and the generation and scoring settings (decoding,
evaluate.batch_size, evaluate.encoder, evaluate.bertscore_layer), never on training. As its own
DVC stage with exactly those dependencies, a change of a train param or of the LoRA rank reruns
train and evaluate but not this: `dvc repro` skips it, and CI pulls its output from the DVC cache.

It writes reports/eval_base/ (a cached DVC output, replaced as a whole):
    base.json          what the results were made from (the test and validation splits' content hashes,
                       the settings above), the base validation loss and the number of generated tokens
    answers.jsonl      one line per test record, in test-split order: id, answer, whether it ended with
                       the end-of-turn token, and its scores (unrounded, as the evaluate stage uses them)
The evaluate stage (python -m stages.evaluate --base reports/eval_base) reads them instead of generating
base answers itself, and refuses results made for another test split or other settings, naming the
command that remakes them.

This module also holds what both stages share: reading a split, record ids, batched greedy answers,
validation loss and per-answer scoring, each with a progress bar (stages/core/progress.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .core import cli, io
from .core.params import Params, load_params
from .core.perf import write_perf
from .core.progress import progress, quiet_library_bars
from .core.records import DataError, Problem, content_hash

STAGE = "evaluate_base"
REQUIRED_FIELDS = ("instruction", "output")
BASE_FILE = "base.json"
ANSWERS_FILE = "answers.jsonl"
FORMAT = 1               # base.json's layout; a different one is stale
REMAKE = ("dvc repro evaluate_base (dvc repro -f evaluate_base if DVC calls it up to date; or by hand: "
          "python -m stages.evaluate_base --data DATA --output BASE_DIR)")


# ---------------------------------------------------------------------------------------------------
# Inputs


class InputError(DataError):
    """A missing input (no per-line problems to list)."""

    def __init__(self, message: str):
        Exception.__init__(self, message)
        self.problems = []


def record_id(record: dict) -> str:
    """A test record's stable id: its own "id" field, else a hash of its system prompt and question
    (the same question has the same id in every revision, whatever its position in the file)."""
    if isinstance(record.get("id"), (str, int)) and not isinstance(record.get("id"), bool):
        return str(record["id"])
    import hashlib

    text = f"{record.get('system', '')}\n{record['instruction']}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def read_split(path: str | Path) -> list[dict]:
    """Records of a processed split; every bad line is reported at once, by line number."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} not found (run the preprocess stage first: dvc repro preprocess)")
    rows, problems = [], []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(Problem(str(path), number, f"not valid JSON ({exc.msg})"))
                continue
            if not isinstance(row, dict):
                problems.append(Problem(str(path), number, "not a JSON object"))
                continue
            bad = [k for k in REQUIRED_FIELDS if not isinstance(row.get(k), str) or not row[k].strip()]
            if bad:
                problems.append(Problem(str(path), number, f"missing or empty {', '.join(bad)}"))
                continue
            row.setdefault("system", "")
            row.setdefault("category", "uncategorised")
            row_id = record_id(row)
            if row_id in seen:
                problems.append(Problem(str(path), number, f"record id {row_id!r} repeats line {seen[row_id]} "
                                                           "(the same question twice, or a repeated \"id\")"))
                continue
            seen[row_id] = number
            rows.append(row)
    if problems:
        raise DataError(f"{path}: {len(problems)} bad record(s)", problems)
    if not rows:
        raise InputError(f"{path} has no records")
    return rows


def read_splits(data_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(test, val) of a processed-data folder; val is empty when there is no val.jsonl."""
    test = read_split(Path(data_dir) / "test.jsonl")
    val_path = Path(data_dir) / "val.jsonl"
    return test, (read_split(val_path) if val_path.is_file() else [])


# ---------------------------------------------------------------------------------------------------
# Generation, validation loss, scoring


@dataclass
class ModelRun:
    answers: list[str]
    finished: list[bool]
    new_tokens: int            # generated tokens, stop tokens included
    generation_s: float
    val_loss: float | None
    scores: list[dict] = field(default_factory=list)
    judge: list[int | None] | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.generation_s if self.generation_s > 0 else 0.0


def generate_answers(model, tokenizer, records: list[dict], decoding, batch_size: int,
                     desc: str = "answers"):
    """Greedy answers in the input order, with `decoding`'s settings (DecodingParams, max_new_tokens
    resolved to a number); prompts are batched by length to keep padding small. A
    progress bar counts answers, with the generated tokens per second as its running value, and the
    decoding step of the batch in progress (so a long batch still reports)."""
    from .core.chat import chat_format
    from .core.generate import generate_batch

    fmt = chat_format(tokenizer)
    max_new_tokens = int(decoding.max_new_tokens)
    prompts = [fmt.prompt_ids(r.get("system", ""), r["instruction"]) for r in records]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers, finished = [""] * len(prompts), [False] * len(prompts)
    new_tokens = 0
    started = time.perf_counter()
    with progress(desc, total=len(prompts), unit="answer") as bar:
        def on_step(step: int) -> None:  # a heartbeat within a long batch: its decoding step
            bar.set(decoding=f"token {step}/{max_new_tokens} of a batch of {len(chunk)}")

        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, gen in zip(chunk, generate_batch(model, [prompts[i] for i in chunk], max_new_tokens, fmt,
                                                    on_step=on_step, **decoding.guard())):
                answers[i] = tokenizer.decode(gen.token_ids, skip_special_tokens=True,
                                              clean_up_tokenization_spaces=False).strip()
                finished[i] = gen.finished
                new_tokens += len(gen.token_ids) + int(gen.finished)
            seconds = time.perf_counter() - started
            bar.update(len(chunk), tokens_per_s=new_tokens / seconds if seconds > 0 else 0.0, decoding=None)
    return answers, finished, new_tokens, time.perf_counter() - started


# Tokens per packed row of the validation-loss pass (no gradients: rows can be longer than training's).
VAL_PACK_TOKENS = 512


def validation_loss(model, tokenizer, records: list[dict], batch_size: int, device) -> float | None:
    """Mean completion-token cross-entropy on the validation split (perplexity = exp)."""
    from .core.chat import chat_format
    from .core.training import evaluate_loss

    if not records:
        return None
    fmt = chat_format(tokenizer)
    examples = [fmt.encode(r.get("system", ""), r["instruction"], r["output"], completion_only=True) for r in records]
    # Packed rows with shared prefixes: the same loss as padded batches (tests/test_training_core.py),
    # without computing padding or each record's copy of the system prompt.
    return float(evaluate_loss(model, examples, batch_size, device, packing=True, pack_tokens=VAL_PACK_TOKENS,
                               pad_id=fmt.pad_id, shared_prefix=True))


def run_model(model, tokenizer, test, val, params: Params, device, name: str = "model",
              known_val_loss: float | None = None) -> ModelRun:
    """Answers for the test split and the validation loss (`known_val_loss` when the caller already has
    it for exactly this model and split: the train stage measured it)."""
    model.eval()
    answers, finished, tokens, seconds = generate_answers(model, tokenizer, test, params.decoding,
                                                          params.evaluate.batch_size, desc=f"{name} answers")
    loss = known_val_loss if known_val_loss is not None else validation_loss(
        model, tokenizer, val, params.evaluate.batch_size, device)
    return ModelRun(answers, finished, tokens, seconds, loss)


def score_answers(answers: list[str], references: list[str], finished: list[bool], semantic,
                  desc: str = "scoring") -> list[dict]:
    """metrics.score_answers, in three steps with a progress bar: BERTScore, semantic similarity, then
    the per-answer rules (ROUGE-L, BLEU-4, exact match, facts, length). The encoder calls are the same
    whole-list calls as in one go, so the scores are identical to metrics.score_answers'."""
    from .core.metrics import score_answers as score_rules

    with progress(desc, total=3, unit="step") as bar:
        bar.set(now="BERTScore")
        bert = semantic.bertscore_f1(answers, references) if semantic else None
        bar.update(1, now="semantic similarity")
        sim = semantic.similarity(answers, references) if semantic else None
        bar.update(1, now="ROUGE-L, BLEU-4, facts")
        rows = score_rules(answers, references, finished, None)
        if semantic:
            for row, b, s in zip(rows, bert, sim):
                row["bertscore_f1"], row["semantic_similarity"] = b, s
        bar.update(1, now=None)
    return rows


# ---------------------------------------------------------------------------------------------------
# The base results: what they were made from, writing, reading and the staleness check


def with_answer_budget(params: Params, tokenizer, test: list[dict]):
    """(params with decoding.max_new_tokens a number, the AnswerBudget): "auto" resolved from the test
    references' token lengths. Base and tuned answers get the same budget (the same tokenizer)."""
    from .core.generate import answer_budget, reference_tokens

    d = params.decoding
    lengths = reference_tokens(tokenizer, [r["output"] for r in test]) if d.max_new_tokens == "auto" else []
    budget = answer_budget(d.max_new_tokens, d.max_new_tokens_cap, lengths)
    return params.model_copy(update={"decoding": d.model_copy(update={"max_new_tokens": budget.max_new_tokens})}), budget


def base_settings(params: Params) -> dict:
    """Everything besides the splits that the base results depend on (the stage's params in dvc.yaml)."""
    e = params.evaluate
    return {"model": params.model.model_dump(mode="json"), "cpu_threads": params.cpu.threads,
            "decoding": params.decoding.model_dump(mode="json"), "batch_size": e.batch_size, "encoder": e.encoder,
            "bertscore_layer": e.bertscore_layer}


def split_identity(rows: list[dict]) -> dict:
    return {"n": len(rows), "hash": content_hash(rows)}


def compute_base(params: Params, test: list[dict], val: list[dict], tokenizer, device, dtype, semantic,
                 log=print) -> ModelRun:
    """The base model's answers, validation loss and scores (the model is loaded and freed here)."""
    import gc

    from .core.modeling import load_base_model

    log(f"[{STAGE}] base model: {params.model.base} on {device}; {len(test)} test, {len(val)} val records")
    model = load_base_model(params.model, dtype=dtype, device=device, tokenizer=tokenizer)
    run = run_model(model, tokenizer, test, val, params, device, name="base")
    del model
    gc.collect()
    run.scores = score_answers(run.answers, [r["output"] for r in test], run.finished, semantic,
                               desc="scoring base answers")
    return run


def write_base(output: str | Path, params: Params, test: list[dict], val: list[dict], run: ModelRun) -> None:
    """reports/eval_base/{base.json, answers.jsonl}, replaced as a whole. Only inputs and results, no
    timings: the same inputs give the same bytes (timings go to logs/perf/evaluate_base.json)."""
    meta = {"format": FORMAT, "test_set": split_identity(test), "val_set": split_identity(val),
            "settings": base_settings(params), "val_loss": run.val_loss, "generated_tokens": run.new_tokens}
    rows = [{"id": record_id(r), "answer": run.answers[i], "ended": run.finished[i], "scores": run.scores[i]}
            for i, r in enumerate(test)]
    with io.atomic_dir(output) as tmp:
        (tmp / ANSWERS_FILE).write_text(io.jsonl_text(rows), encoding="utf-8")
        io.write_json(tmp / BASE_FILE, meta)


class StaleBaseError(InputError):
    """Base results that were made from other inputs than the current ones."""


def _differences(meta: dict, params: Params, test: list[dict], val: list[dict]) -> list[str]:
    found = []
    for name, rows, path in (("test_set", test, "test.jsonl"), ("val_set", val, "val.jsonl")):
        made, now = meta.get(name) or {}, split_identity(rows)
        if made != now:
            found.append(f"the {name.replace('_set', '')} split ({path}: {now['n']} records, hash {now['hash'][:12]}; "
                         f"the results: {made.get('n')} records, hash {str(made.get('hash'))[:12]})")
    made, now = meta.get("settings") or {}, base_settings(params)
    names = {"model": "model", "cpu_threads": "cpu.threads", "decoding": "decoding",
             "batch_size": "evaluate.batch_size", "encoder": "evaluate.encoder",
             "bertscore_layer": "evaluate.bertscore_layer"}
    for key, label in names.items():
        if made.get(key) != now[key]:
            if key in ("model", "decoding"):
                keys = sorted(k for k in set(now[key]) | set(made.get(key) or {})
                              if (made.get(key) or {}).get(k) != now[key].get(k))
                found.append("params " + ", ".join(f"{key}.{k} ({now[key].get(k)!r} now, "
                                                   f"{(made.get(key) or {}).get(k)!r} in the results)"
                                                   if key == "decoding" else f"model.{k}" for k in keys))
            else:
                found.append(f"params {label} ({now[key]!r} now, {made.get(key)!r} in the results)")
    return found


def load_base(base_dir: str | Path, params: Params, test: list[dict], val: list[dict]) -> ModelRun:
    """The base results for exactly these splits and settings, as a ModelRun in test-split order.
    Missing, unreadable or made from other inputs: an error that names the command to run."""
    base_dir = Path(base_dir)
    meta_path, answers_path = base_dir / BASE_FILE, base_dir / ANSWERS_FILE
    if not meta_path.is_file() or not answers_path.is_file():
        raise InputError(f"{meta_path if not meta_path.is_file() else answers_path} not found: the base model's "
                         f"answers come from the evaluate_base stage; run it first: {REMAKE}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        rows = io.read_jsonl(answers_path)
    except ValueError as exc:
        raise InputError(f"{base_dir} is not readable ({exc}); remake it: {REMAKE}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StaleBaseError(f"{meta_path} is not in this version's format; remake it: {REMAKE}")
    stale = _differences(meta, params, test, val)
    if stale:
        raise StaleBaseError(f"{base_dir} is stale: it was made for other inputs than the current ones: "
                             + "; ".join(stale) + f". Remake it: {REMAKE}")
    by_id = {row.get("id"): row for row in rows if isinstance(row, dict)}
    ids = [record_id(r) for r in test]
    if set(by_id) != set(ids) or len(rows) != len(ids):
        raise StaleBaseError(f"{answers_path} does not hold one answer per test record; remake it: {REMAKE}")
    ordered = [by_id[i] for i in ids]
    return ModelRun(answers=[r["answer"] for r in ordered], finished=[bool(r["ended"]) for r in ordered],
                    new_tokens=int(meta["generated_tokens"]), generation_s=0.0, val_loss=meta["val_loss"],
                    scores=[r["scores"] for r in ordered])


# ---------------------------------------------------------------------------------------------------
# The stage


def evaluate_base(params: Params, test: list[dict], val: list[dict], log=print) -> tuple[ModelRun, dict, Params]:
    """The base run, its timings (for logs/perf, not for the outputs) and the params it ran with
    (decoding.max_new_tokens resolved)."""
    from .core import metrics as M
    from .core.determinism import fix_cpu_threads
    from .core.modeling import load_model_tokenizer, resolve_device, resolve_dtype

    started = time.perf_counter()
    # The tokenizer the train stage saves into models/adapter/tokenizer is this one (load_tokenizer
    # with the chat format prepared), so base prompts are the tokens the evaluate stage would build.
    tokenizer = load_model_tokenizer(params.model)
    params, budget = with_answer_budget(params, tokenizer, test)
    log(f"[{STAGE}] max_new_tokens {budget.max_new_tokens}: {budget.rule}")
    device = resolve_device("auto")
    fix_cpu_threads(params.cpu.threads, device)  # the same bytes whatever the core count (determinism.py)
    dtype = resolve_dtype("auto", device)
    semantic = M.SemanticScorer(params.evaluate.encoder, params.evaluate.bertscore_layer, device=str(device))
    run = compute_base(params, test, val, tokenizer, device, dtype, semantic, log)
    speed = {"device": str(device), "batch_size": params.evaluate.batch_size,
             "base_generated_tokens": run.new_tokens, "base_tokens_per_s": round(run.tokens_per_s, 1),
             "generation_s": round(run.generation_s, 2), "total_s": round(time.perf_counter() - started, 2)}
    return run, speed, params


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return cli.run(lambda: stage_main(argv), STAGE)


def stage_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate_base", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/processed", help="folder with test.jsonl and val.jsonl")
    parser.add_argument("--output", default="reports/eval_base", help="folder for base.json and answers.jsonl")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--base-model", default="", help=cli.BASE_MODEL_HELP)
    args = parser.parse_args(argv)
    params = load_params(args.params)
    cli.use_base_model(args.base_model, params.model)
    quiet_library_bars()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if all_local(params):  # nothing to download: never let a library try the hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    test, val = read_splits(args.data)
    run, speed, params = evaluate_base(params, test, val)
    write_base(args.output, params, test, val, run)
    write_perf(STAGE, speed)
    from .core.metrics import aggregate

    headline = aggregate(run.scores, run.answers, [r["output"] for r in test])
    loss = f"; val loss {run.val_loss:.3f}" if run.val_loss is not None else ""
    print(f"[{STAGE}] base ROUGE-L {headline['rouge_l']:.3f}, fact recall {headline['fact_recall'] or 0:.3f}{loss}; "
          f"{speed['base_tokens_per_s']:.0f} generated tokens/s; {speed['total_s']:.1f} s")
    print(f"[{STAGE}] wrote {args.output}/ ({BASE_FILE}, {ANSWERS_FILE})")
    return 0


def all_local(params: Params) -> bool:
    """Nothing evaluation loads is a hub id still to resolve: the embedded or a packaged model, a local
    folder, or the base stage's folder (use_base_folder)."""
    from .core.modeling import EMBEDDED, PACKAGED, FolderSource, base_source

    def local(name: str) -> bool:
        return name == EMBEDDED or name in PACKAGED or Path(name).exists()

    base_here = isinstance(base_source(params.model), FolderSource) or local(params.model.base)
    tokenizer_here = local(params.model.tokenizer) or (params.model.tokenizer == params.model.base and base_here)
    return base_here and tokenizer_here and local(params.evaluate.encoder)


if __name__ == "__main__":
    sys.exit(main())
