"""Blue/green rollout on the managed online endpoint, as plain functions.

The plan (`plan_rollout`) is a list of actions computed from params.yaml `azure.rollout` and the
endpoint's current traffic; `execute` walks it against a `World` (anything with the methods below),
so the same code runs against Azure (`stages.azure.endpoints.AzureWorld`) and against the crafted
metric and health sequences of tests/test_rollout.py.

    check_gate            metrics/eval.json gate.passed must be true (azure.rollout.require_gate)
    create_deployment     the new colour, at 0% traffic
    smoke_test            azure.rollout.smoke_prompts through the endpoint, addressed to the new colour
    set_traffic / observe for each step: mirror p% (answers discarded) or route p% to the new colour,
                          then watch its error rate for observe_minutes (extended while it has seen
                          fewer than min_requests requests, up to MAX_EXTENSIONS times)
    delete_deployment     the old colour, once the new one carries 100%

Any failure returns all traffic to the old colour, clears the mirror and deletes the new colour.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from stages.core.params import RolloutParams

MAX_EXTENSIONS = 3


@dataclass(frozen=True)
class Action:
    kind: str                      # check_gate | create_deployment | smoke_test | set_traffic | observe | delete_deployment
    color: str = ""
    traffic: dict = field(default_factory=dict)
    mirror: dict = field(default_factory=dict)
    minutes: float = 0.0
    step: int = -1                 # index into rollout.steps for set_traffic/observe

    def describe(self) -> str:
        if self.kind == "set_traffic":
            mirror = f", mirror {self.mirror}" if self.mirror else ""
            return f"set traffic {self.traffic}{mirror}"
        if self.kind == "observe":
            return f"observe {self.color} for {self.minutes:g} min"
        return f"{self.kind.replace('_', ' ')} {self.color}".strip()


@dataclass(frozen=True)
class Health:
    """What the new colour did during one observation window."""
    requests: int
    errors: int                    # 5xx answers (4xx are the caller's fault and do not count)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass
class Result:
    status: str                    # promoted | rolled_back | refused
    old: str | None
    new: str
    reason: str = ""
    log: list[str] = field(default_factory=list)
    traffic: dict = field(default_factory=dict)


class World(Protocol):
    def gate(self) -> tuple[bool, str]: ...
    def create_deployment(self, color: str) -> None: ...
    def smoke_test(self, color: str) -> tuple[bool, str]: ...
    def set_traffic(self, traffic: dict, mirror: dict) -> None: ...
    def observe(self, color: str, minutes: float) -> Health: ...
    def delete_deployment(self, color: str) -> None: ...


def pick_colors(colors: list[str], traffic: dict[str, int]) -> tuple[str | None, str]:
    """(old, new): old is the colour carrying traffic now (None on the first deployment)."""
    live = {name: share for name, share in (traffic or {}).items() if share > 0}
    unknown = set(live) - set(colors)
    if unknown:
        raise ValueError(f"endpoint routes traffic to {sorted(unknown)}, not one of the colours {colors}")
    if not live:
        return None, colors[0]
    old = max(live, key=lambda name: (live[name], name))
    if len(live) > 1:
        raise ValueError(f"endpoint is mid-rollout (traffic {live}): finish or roll back first")
    return old, next(c for c in colors if c != old)


def plan_rollout(rollout: RolloutParams, colors: list[str], traffic: dict[str, int]) -> list[Action]:
    old, new = pick_colors(colors, traffic)
    actions = []
    if rollout.require_gate:
        actions.append(Action("check_gate"))
    actions += [Action("create_deployment", new), Action("smoke_test", new)]
    if old is None:  # first deployment: nothing to compare with or fall back to
        actions += [Action("set_traffic", traffic={new: 100}, step=len(rollout.steps) - 1),
                    Action("observe", new, minutes=rollout.steps[-1].observe_minutes, step=len(rollout.steps) - 1)]
        return actions
    for index, step in enumerate(rollout.steps):
        if step.mode == "mirror":
            split, mirror = {old: 100, new: 0}, {new: step.percent}
        else:
            split, mirror = {old: 100 - step.percent, new: step.percent}, {}
        actions.append(Action("set_traffic", traffic=split, mirror=mirror, step=index))
        actions.append(Action("observe", new, minutes=step.observe_minutes, step=index))
    actions.append(Action("delete_deployment", old))
    return actions


def rollback_actions(old: str | None, new: str) -> list[Action]:
    actions = []
    if old is not None:
        actions.append(Action("set_traffic", traffic={old: 100, new: 0}, mirror={}))
    actions.append(Action("delete_deployment", new))
    return actions


def judge(health: Health, rollout: RolloutParams) -> tuple[str, str]:
    """("pass" | "fail" | "wait", reason) for one observation of the new colour."""
    if health.requests < rollout.min_requests:
        return "wait", f"{health.requests} requests < min_requests {rollout.min_requests}"
    if health.error_rate > rollout.max_error_rate:
        return "fail", (f"error rate {health.error_rate:.2%} ({health.errors}/{health.requests}) "
                        f"> max_error_rate {rollout.max_error_rate:.2%}")
    return "pass", f"error rate {health.error_rate:.2%} over {health.requests} requests"


def execute(actions: list[Action], world: World, rollout: RolloutParams, colors: list[str],
            traffic: dict[str, int]) -> Result:
    old, new = pick_colors(colors, traffic)
    result = Result(status="promoted", old=old, new=new, traffic=dict(traffic))
    created = False

    def fail(reason: str, refused: bool = False) -> Result:
        result.status, result.reason = ("refused" if refused else "rolled_back"), reason
        result.log.append(f"FAILED: {reason}")
        if created:
            for action in rollback_actions(old, new):
                result.log.append(f"rollback: {action.describe()}")
                apply(action)
        return result

    def apply(action: Action) -> None:
        if action.kind == "set_traffic":
            world.set_traffic(action.traffic, action.mirror)
            result.traffic = dict(action.traffic)
        elif action.kind == "delete_deployment":
            world.delete_deployment(action.color)
            result.traffic.pop(action.color, None)

    for action in actions:
        result.log.append(action.describe())
        if action.kind == "check_gate":
            passed, reason = world.gate()
            if not passed:
                return fail(f"quality gate failed: {reason}", refused=True)
        elif action.kind == "create_deployment":
            world.create_deployment(action.color)
            created = True
        elif action.kind == "smoke_test":
            ok, detail = world.smoke_test(action.color)
            if not ok:
                return fail(f"smoke test of {action.color}: {detail}")
        elif action.kind == "observe":
            verdict, reason = "wait", ""
            for _ in range(MAX_EXTENSIONS + 1):
                verdict, reason = judge(world.observe(action.color, action.minutes), rollout)
                result.log.append(f"  {verdict}: {reason}")
                if verdict != "wait":
                    break
            if verdict == "fail":
                return fail(f"step {action.step + 1}: {reason}")
            if verdict == "wait":
                return fail(f"step {action.step + 1}: not enough traffic to judge ({reason}) "
                            f"after {MAX_EXTENSIONS} extensions")
            if rollout.require_gate:  # the gate must still hold (metrics can be re-evaluated meanwhile)
                passed, gate_reason = world.gate()
                if not passed:
                    return fail(f"step {action.step + 1}: quality gate failed: {gate_reason}")
        else:
            apply(action)
    if old is None:
        result.traffic = {new: 100}
    return result
