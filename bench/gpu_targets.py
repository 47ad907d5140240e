"""Issue 22's targets, judged on a kit report (bench.gpu): one verdict per target, printed under the
table and kept in gpu_bench.json as "targets", so a GPU run says itself which target it met.

Each target reads one figure of the report for the kit's main configuration (the verdict): training's
`ours` (the kit's tokens per step and row length, every other setting as params.yaml has it) and the
endpoint's engine as params.yaml configures it. It lists the same figure for the levers the kit also
measured (varlen attention, shorter packed rows, compiled steps), so a lever that meets a target the
main configuration misses is named beside it.
The targets are stated for an H200 (issue 22); a run on another GPU is judged all the same and says
so. A CPU smoke is never judged: its figures are the embedded model's, plumbing only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.gpu_parts import steady_rate

STATED_FOR = "H200"
DEFAULT_TRAIN = "ours"                          # train_1b's main run (the kit's step size and rows)
DEFAULT_SERVE = "continuous (the default)"      # the endpoint's engine as params.yaml configures it


@dataclass(frozen=True)
class Figure:
    label: str            # which run the value is from
    value: float
    measure: str = ""     # how it was taken (e.g. "steady state, epochs 2-4")


@dataclass
class Verdict:
    key: str
    goal: str             # the target in words, with its threshold
    status: str           # "met", "not met", "not measured", "not judged"
    figure: Figure | None = None
    why: str = ""         # for "not measured" / "not judged", or the comparison behind a check
    levers: list[tuple[Figure, bool]] = field(default_factory=list)  # other runs, and whether each meets it

    def as_dict(self) -> dict:
        fig = lambda f: {"run": f.label, "value": f.value, "measure": f.measure}  # noqa: E731
        return {"goal": self.goal, "status": self.status, "why": self.why,
                "figure": fig(self.figure) if self.figure else None,
                "levers": [{**fig(f), "meets": ok} for f, ok in self.levers]}


# How each verdict's figure prints, by its key's unit.
FORMATS = {"tokens_per_s": "{:,.0f}", "mfu": "{:.1%}", "p95_s": "{:.2f} s", "loss": "{:.4f}", "elapsed_s": "{:,.0f} s",
           "ratio": "{:.2f}x"}


def _fmt(key: str, value: float) -> str:
    unit = next(u for u in FORMATS if key.endswith(u))
    return FORMATS[unit].format(value)


def _line(key: str, verdict: dict) -> str:
    """One verdict of gpu_bench.json's "targets" as the report prints it."""
    text = f"- target, {verdict['goal']}: "
    figure = verdict["figure"]
    if figure is None:
        text += f"{verdict['status']} ({verdict['why']})"
    else:
        measure = f" ({figure['measure']})" if figure["measure"] else ""
        text += f"{figure['run']} {_fmt(key, figure['value'])}{measure}: {verdict['status']}"
        text += f" ({verdict['why']})" if verdict["why"] else ""
    if verdict["levers"]:
        text += "; also measured: " + ", ".join(
            f"{f['run']} {_fmt(key, f['value'])} ({'meets it' if f['meets'] else 'does not'})" for f in verdict["levers"])
    return text


# --------------------------------------------------------------------------------------------------
# Where each figure is in the report
# --------------------------------------------------------------------------------------------------

def _rows(rep: dict, part: str) -> list[dict]:
    return [r for r in rep["parts"].get(part, {}).get("rows", []) if "tokens_per_s" in r]


def _training_figures(rep: dict, key: str) -> list[Figure]:
    """1B LoRA training: the default recipe ("ours") and its levers, steady state where measured."""
    figures = []
    runs = [r for r in _rows(rep, "train_1b")
            if r["run"] == "ours" or r["run"].startswith("ours, ")]  # ours and its levers, not ours-records/-1ep
    runs += [r for r in _rows(rep, "compile") if r["run"] == "ours-compiled"]
    for row in runs:
        steady = row.get("steady") or {}
        if key == "tokens_per_s":
            value = steady_rate(row)
        else:
            value = steady.get("mfu") if steady.get("mfu") is not None else row.get("mfu")
        if value is None:
            continue
        epochs = row.get("epochs")
        measure = (f"steady state, epochs {steady['epochs']}" if steady
                   else "1 epoch" if epochs == 1 else f"all {epochs} epochs")
        figures.append(Figure(row["run"], value, measure))
    return figures


def _serve_figures(rep: dict, level: int, key: str) -> list[Figure]:
    """The endpoint's continuous engine at one concurrency: the default settings (serve part; the
    serve_compile part's eager engine where serve did not run), then the compiled step and
    transformers' default KV padding (the A/B engine), then the per-stream reference (transformers'
    generate, static cache, compiled) at the batch size of that concurrency, named as not the endpoint."""
    wanted = f"concurrency {level}"
    default, others = None, []
    for part in ("serve", "serve_compile"):
        for row in _rows(rep, part):
            if not row["run"].startswith("continuous") or not row["run"].endswith(wanted) or key not in row:
                continue
            label = row["run"][: -len(wanted)].rstrip(", ")
            if label == "continuous":
                default = default or Figure(DEFAULT_SERVE, row[key], "" if part == "serve" else f"{part} part")
            else:
                others.append(Figure(label, row[key]))
    for row in _rows(rep, "serve_static_cache"):
        if row["run"] == f"generate, static cache, compiled, batch {level}" and key in row:
            others.append(Figure(f"{row['run']} (not the endpoint's engine)", row[key]))
    return ([default] if default else []) + others


# --------------------------------------------------------------------------------------------------
# The targets
# --------------------------------------------------------------------------------------------------

def _threshold(key: str, goal: str, figures: list[Figure], default: str, *, at_least: float | None = None,
               at_most: float | None = None, stretch: float | None = None, why_missing: str = "") -> Verdict:
    """The default run's figure against the target; the levers' figures listed beside it."""
    meets = (lambda v: v >= at_least) if at_least is not None else (lambda v: v <= at_most)  # noqa: E731
    limit = at_least if at_least is not None else at_most
    levers = [(f, meets(f.value)) for f in figures if f.label != default]
    chosen = next((f for f in figures if f.label == default), None)
    if chosen is None:
        return Verdict(key, goal, "not measured", why=why_missing, levers=levers)
    status = "met" if meets(chosen.value) else "not met"
    if status == "met" and stretch is not None and chosen.value >= stretch:
        status = "met, the stretch goal too"
    return Verdict(key, goal, status, chosen, f"{chosen.value / limit:.2f}x the target", levers)


def _loss_target(rep: dict) -> Verdict:
    goal = "final loss on the baseline's tokens no worse than the Trainer + PEFT baseline's"
    loss = rep["parts"].get("train_1b", {}).get("loss_same_tokens")
    if not loss:
        return Verdict("train_loss", goal, "not measured", why="train_1b's ours-1ep or baseline did not run")
    ours, base = loss["ours"], loss["baseline"]
    return Verdict("train_loss", goal, "met" if ours <= base else "not met", Figure("ours-1ep", ours),
                   f"baseline {base:.4f}, {(ours - base) / base:+.1%}")


def _train_3b_target(rep: dict) -> Verdict:
    goal = "train_3b runs inside the kit's budget"
    part = rep["parts"].get("train_3b")
    if part is None:
        return Verdict("train_3b_elapsed_s", goal, "not measured", why="not among --parts")
    if part.get("status") == "ok" and _rows(rep, "train_3b"):
        return Verdict("train_3b_elapsed_s", goal, "met", Figure("the part took", part.get("elapsed_s", 0)))
    status = part.get("status", "no result")
    # skipped for want of the budget, or failed: it did not run inside the budget; skipped for
    # another reason (no CUDA, a package absent): nothing was measured
    unmeasured = status.startswith("skipped:") and not status.startswith("skipped: budget")
    return Verdict("train_3b_elapsed_s", goal, "not measured" if unmeasured else "not met", why=status)


def _qlora_check(rep: dict) -> Verdict:
    goal = "QLoRA no faster than bf16 LoRA under the same warm-up and an A B B A order"
    part = rep["parts"].get("qlora")
    vs = (part or {}).get("vs_bf16_lora")
    if not vs:
        skipped = sorted({r["status"] for r in (part or {}).get("rows", []) if "status" in r})
        why = "not among --parts" if part is None else "; ".join(skipped) or part.get("status", "no result")
        return Verdict("qlora_ratio", goal, "not measured", why=why)
    ratio = vs["tokens_per_s_ratio"]
    return Verdict("qlora_ratio", goal, "met" if ratio <= 1 else "not met", Figure("QLoRA / LoRA tokens/s", ratio),
                   f"spread lora {vs['lora_spread']:.1%}, qlora {vs['qlora_spread']:.1%}"
                   + ("" if ratio <= 1 else "; nf4 dequantisation adds work, so a ratio above 1 is a measurement fault"))


def _loss_head_check(rep: dict) -> Verdict:
    goal = "fused_loss auto picks the faster head that fits its memory budget"
    part = rep["parts"].get("loss_head", {})
    rule = part.get("auto_rule")
    speeds = {r["run"]: r["tokens_per_s"] for r in _rows(rep, "loss_head") if r["run"] in ("liger", "completion")}
    if not rule or len(speeds) < 2:
        return Verdict("loss_head", goal, "not measured",
                       why="needs the liger and labelled-logits rows and the rule's pick (liger runs on CUDA only)")
    fits = rule["estimated_mb"] <= rule["budget_mb"]
    best = max(speeds, key=speeds.get) if fits else "liger"
    return Verdict("loss_head", goal, "met" if rule["pick"] == best else "not met", None,
                   f"picks {rule['pick']}; measured liger {speeds['liger']:,.0f}, labelled logits "
                   f"{speeds['completion']:,.0f} positions/s; logits {rule['estimated_mb']:,.0f} MiB "
                   f"{'<=' if fits else '>'} budget {rule['budget_mb']:,} MiB")


def judge(rep: dict) -> list[Verdict]:
    """Every target of issue 22, judged on this report (not judged in a CPU smoke)."""
    verdicts = [
        _threshold("train_tokens_per_s", "1B LoRA training at least 20,000 real tokens/s (stretch 40,000)",
                   _training_figures(rep, "tokens_per_s"), DEFAULT_TRAIN, at_least=20_000, stretch=40_000,
                   why_missing="train_1b's ours did not run"),
        _threshold("train_mfu", "1B LoRA training at least 15% MFU (stretch 30%)",
                   _training_figures(rep, "mfu"), DEFAULT_TRAIN, at_least=0.15, stretch=0.30,
                   why_missing="no MFU: train_1b's ours did not run on a GPU"),
        _loss_target(rep),
        _train_3b_target(rep),
        _qlora_check(rep),
        _loss_head_check(rep),
        _threshold("serve_c32_tokens_per_s", "endpoint at concurrency 32 at least 3,500 output tokens/s",
                   _serve_figures(rep, 32, "tokens_per_s"), DEFAULT_SERVE, at_least=3_500,
                   why_missing="no continuous-engine row at concurrency 32 with the default settings"),
        _threshold("serve_c32_p95_s", "endpoint at concurrency 32 with p95 latency at most 3 s",
                   _serve_figures(rep, 32, "p95_s"), DEFAULT_SERVE, at_most=3.0,
                   why_missing="no continuous-engine row at concurrency 32 with the default settings"),
        _threshold("serve_c1_tokens_per_s", "endpoint at concurrency 1 at least 250 output tokens/s",
                   _serve_figures(rep, 1, "tokens_per_s"), DEFAULT_SERVE, at_least=250,
                   why_missing="no continuous-engine row at concurrency 1 with the default settings"),
    ]
    if rep["kit"]["mode"] != "cuda":
        for v in verdicts:
            v.status, v.levers = "not judged", []
            v.why = "a CPU smoke: the embedded model's figures, plumbing only"
            v.figure = None
    return verdicts


def report_section(rep: dict) -> dict:
    """gpu_bench.json's "targets": the device they were judged on and one entry per target."""
    device = rep["kit"].get("device_name") or "unknown"
    return {"stated_for": STATED_FOR, "device": device, "same_gpu": STATED_FOR in device,
            "verdicts": {v.key: v.as_dict() for v in judge(rep)}}


def lines(rep: dict) -> list[str]:
    """The verdicts under the report's table, from its "targets" (judged once, by report_section)."""
    targets = rep["targets"]
    if rep["kit"]["mode"] != "cuda":
        return ["- targets of issue 22: not judged (a CPU smoke: the embedded model's figures, plumbing only)"]
    head = (f"- targets of issue 22 (stated for an {STATED_FOR}; this run: {targets['device']}"
            + ("" if targets["same_gpu"] else ", a different GPU: read the verdicts with that in mind") + "):")
    return [head] + [_line(key, verdict) for key, verdict in targets["verdicts"].items()]
