"""Blue/green rollout plan and execution on crafted gate, smoke and health sequences (no Azure)."""

from __future__ import annotations

import pytest

from stages.azure.rollout import (MAX_EXTENSIONS, Action, Health, execute, judge, pick_colors, plan_rollout,
                                  rollback_actions)
from stages.core.params import ConfigError, RolloutParams, validate_params

COLORS = ["blue", "green"]


def rollout(**overrides) -> RolloutParams:
    base = {"steps": [{"mode": "mirror", "percent": 10, "observe_minutes": 10},
                      {"mode": "traffic", "percent": 10, "observe_minutes": 15},
                      {"mode": "traffic", "percent": 100, "observe_minutes": 0}],
            "max_error_rate": 0.01, "min_requests": 20}
    base.update(overrides)
    return RolloutParams.model_validate(base)


class FakeWorld:
    """Records every call; answers from crafted sequences."""

    def __init__(self, health=(), gate=(True, "passed"), smoke=(True, "ok"), gates=None):
        self.health = list(health)
        self.gate_answer, self.gates = gate, list(gates) if gates else None
        self.smoke = smoke
        self.calls = []
        self.traffic, self.mirror, self.deployments = {}, {}, set()

    def gate(self):
        self.calls.append(("gate",))
        return self.gates.pop(0) if self.gates else self.gate_answer

    def create_deployment(self, color):
        self.calls.append(("create", color))
        self.deployments.add(color)

    def smoke_test(self, color):
        self.calls.append(("smoke", color))
        return self.smoke

    def set_traffic(self, traffic, mirror):
        self.calls.append(("traffic", dict(traffic), dict(mirror)))
        self.traffic, self.mirror = dict(traffic), dict(mirror)

    def observe(self, color, minutes):
        self.calls.append(("observe", color, minutes))
        return self.health.pop(0)

    def delete_deployment(self, color):
        self.calls.append(("delete", color))
        self.deployments.discard(color)
        self.traffic.pop(color, None)


def test_pick_colors():
    assert pick_colors(COLORS, {}) == (None, "blue")
    assert pick_colors(COLORS, {"blue": 100}) == ("blue", "green")
    assert pick_colors(COLORS, {"green": 100, "blue": 0}) == ("green", "blue")
    with pytest.raises(ValueError, match="mid-rollout"):
        pick_colors(COLORS, {"blue": 90, "green": 10})
    with pytest.raises(ValueError, match="not one of the colours"):
        pick_colors(COLORS, {"red": 100})


def test_plan_follows_params_steps_with_mirror():
    plan = plan_rollout(rollout(), COLORS, {"blue": 100})
    assert [a.kind for a in plan] == ["check_gate", "create_deployment", "smoke_test",
                                      "set_traffic", "observe", "set_traffic", "observe",
                                      "set_traffic", "observe", "delete_deployment"]
    assert plan[1].color == "green" and plan[2].color == "green"
    assert plan[3].traffic == {"blue": 100, "green": 0} and plan[3].mirror == {"green": 10}
    assert plan[4].minutes == 10
    assert plan[5].traffic == {"blue": 90, "green": 10} and plan[5].mirror == {}
    assert plan[7].traffic == {"blue": 0, "green": 100}
    assert plan[9] == Action("delete_deployment", "blue")


def test_plan_from_real_params(params):
    plan = plan_rollout(params.azure.rollout, params.azure.endpoint.deployment_colors, {"blue": 100})
    shares = [a.traffic.get("green") for a in plan if a.kind == "set_traffic"]
    assert shares[-1] == 100 and shares == sorted(shares)


def test_first_deployment_goes_straight_to_full_traffic():
    plan = plan_rollout(rollout(), COLORS, {})
    assert [a.kind for a in plan] == ["check_gate", "create_deployment", "smoke_test", "set_traffic", "observe"]
    assert plan[3].traffic == {"blue": 100}


def test_happy_path_promotes_and_retires_old_colour():
    world = FakeWorld(health=[Health(200, 0), Health(50, 0), Health(400, 2)])
    result = execute(plan_rollout(rollout(), COLORS, {"blue": 100}), world, rollout(), COLORS, {"blue": 100})
    assert result.status == "promoted", result.log
    assert world.traffic == {"green": 100} and world.mirror == {}
    assert world.deployments == {"green"}            # blue deleted after green took 100%
    assert ("delete", "blue") in world.calls and ("delete", "green") not in world.calls
    assert result.traffic == {"green": 100}


def test_error_rate_breach_rolls_back_and_deletes_new():
    world = FakeWorld(health=[Health(200, 0), Health(100, 5)])   # 5% > 1% at the 10% step
    plan = plan_rollout(rollout(), COLORS, {"blue": 100})
    world.deployments.add("blue")
    result = execute(plan, world, rollout(), COLORS, {"blue": 100})
    assert result.status == "rolled_back"
    assert "step 2" in result.reason and "error rate 5.00%" in result.reason
    assert world.traffic == {"blue": 100} and world.mirror == {}
    assert world.deployments == {"blue"}
    assert world.calls[-2:] == [("traffic", {"blue": 100, "green": 0}, {}), ("delete", "green")]
    # the 100% step never happened
    assert ("traffic", {"blue": 0, "green": 100}, {}) not in world.calls


def test_failure_during_mirror_never_routes_live_traffic():
    world = FakeWorld(health=[Health(100, 50)])
    result = execute(plan_rollout(rollout(), COLORS, {"green": 100}), world, rollout(), COLORS, {"green": 100})
    assert result.status == "rolled_back" and "step 1" in result.reason
    routed = [c for c in world.calls if c[0] == "traffic"]
    assert all(call[1].get("blue", 0) == 0 for call in routed)
    assert world.calls[-1] == ("delete", "blue")


def test_smoke_failure_rolls_back_before_any_traffic():
    world = FakeWorld(smoke=(False, "HTTP 500 on 'What is the PM job code?'"))
    result = execute(plan_rollout(rollout(), COLORS, {"blue": 100}), world, rollout(), COLORS, {"blue": 100})
    assert result.status == "rolled_back" and "smoke test of green: HTTP 500" in result.reason
    assert not any(c[0] == "observe" for c in world.calls)
    assert world.calls[-1] == ("delete", "green")


def test_gate_failure_refuses_without_touching_the_endpoint():
    world = FakeWorld(gate=(False, "tuned rougeL 0.10 < base 0.12"))
    result = execute(plan_rollout(rollout(), COLORS, {"blue": 100}), world, rollout(), COLORS, {"blue": 100})
    assert result.status == "refused" and "rougeL" in result.reason
    assert world.calls == [("gate",)]


def test_gate_rechecked_at_each_step():
    world = FakeWorld(health=[Health(200, 0), Health(200, 0)], gates=[(True, ""), (True, ""), (False, "re-evaluated")])
    result = execute(plan_rollout(rollout(), COLORS, {"blue": 100}), world, rollout(), COLORS, {"blue": 100})
    assert result.status == "rolled_back" and "step 2: quality gate failed" in result.reason
    assert world.traffic == {"blue": 100}


def test_low_traffic_extends_then_judges():
    world = FakeWorld(health=[Health(5, 0), Health(30, 0), Health(100, 0), Health(100, 0)])
    result = execute(plan_rollout(rollout(), COLORS, {"blue": 100}), world, rollout(), COLORS, {"blue": 100})
    assert result.status == "promoted"
    assert sum(1 for c in world.calls if c[0] == "observe") == 4


def test_never_enough_traffic_rolls_back():
    world = FakeWorld(health=[Health(1, 0)] * (MAX_EXTENSIONS + 1))
    result = execute(plan_rollout(rollout(), COLORS, {"blue": 100}), world, rollout(), COLORS, {"blue": 100})
    assert result.status == "rolled_back" and "not enough traffic" in result.reason
    assert world.traffic == {"blue": 100}


def test_first_deployment_failure_deletes_it():
    world = FakeWorld(health=[Health(100, 10)])
    result = execute(plan_rollout(rollout(), COLORS, {}), world, rollout(), COLORS, {})
    assert result.status == "rolled_back" and world.calls[-1] == ("delete", "blue")
    assert rollback_actions(None, "blue") == [Action("delete_deployment", "blue")]


@pytest.mark.parametrize("health,verdict", [
    (Health(19, 0), "wait"), (Health(20, 0), "pass"), (Health(100, 1), "pass"), (Health(100, 2), "fail"),
])
def test_judge_thresholds(health, verdict):
    assert judge(health, rollout())[0] == verdict


@pytest.mark.parametrize("steps,message", [
    ([{"mode": "traffic", "percent": 50}], "last traffic step must route 100%"),
    ([{"mode": "traffic", "percent": 50}, {"mode": "traffic", "percent": 10}, {"mode": "traffic", "percent": 100}],
     "must not decrease"),
    ([{"mode": "mirror", "percent": 60}, {"mode": "traffic", "percent": 100}], "at most 50%"),
])
def test_bad_rollout_params_are_named(steps, message):
    with pytest.raises(ConfigError, match=message):
        validate_params({"azure": {"rollout": {"steps": steps}}})
