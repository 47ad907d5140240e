"""Property-based fuzzing of the running azmlinfsrv (issue 13, item 12).

Arbitrary JSON values (as the body, as a request object's fields, inside a batch) and arbitrary
bytes are POSTed to /score. For every one: no 5xx, an error body under ERROR_BODY_CAP bytes, and
no client string (value or key, 6 characters or more) repeated in an error. At the end the worker
is the same process and `/` is healthy. Bounded: EXAMPLES per property, derandomised (the same
examples on every run, so CI is stable), no example database, about 20-40 s in all here.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages.deploy import LocalServer, http_exchange
from test_serve import serve_config

EXAMPLES = 120
ERROR_BODY_CAP = 4096
MIN_ECHO = 6  # shorter strings may occur in our own messages by chance ("body", digits)
OWN_WORDS = "instruction system max_new_tokens temperature requests body"  # ours: may be repeated
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

text = st.text(st.characters(exclude_categories=[]), max_size=40)  # any code point, lone surrogates included
scalars = st.none() | st.booleans() | st.integers() | st.floats() | text
json_values = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(text, children, max_size=4), max_leaves=12)
field_values = {
    "instruction": json_values | st.text(min_size=1, max_size=60),
    "system": json_values,
    "max_new_tokens": st.integers(-5, 40) | json_values,
    "temperature": st.floats(-1, 3) | json_values,
}
request_objects = st.fixed_dictionaries({}, optional=field_values) | st.dictionaries(
    text | st.sampled_from(sorted(field_values)), json_values, max_size=6)
bodies = json_values | request_objects | st.builds(lambda rows: {"requests": rows},
                                                     st.lists(request_objects | json_values, max_size=5))


@pytest.fixture(scope="module")
def server(merged, module_dir):
    work = module_dir("fuzz")
    # Short answers keep the valid examples cheap; the limits are the ones test_serve uses.
    config = serve_config(work / "requests.jsonl", max_new_tokens_default=2, max_new_tokens_limit=4)
    with LocalServer(merged, config, port=0, work_dir=work, readiness_timeout_s=180) as running:
        yield running


def strings_in(value) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(strings_in(k) | strings_in(v) for k, v in value.items())) if value else set()
    if isinstance(value, list):
        return set().union(*(strings_in(v) for v in value)) if value else set()
    return set()


def check_answer(status: int, raw: bytes, sent_strings: set[str]) -> None:
    assert status < 500, (status, raw[:500])
    if status == 200:
        return
    assert len(raw) <= ERROR_BODY_CAP, (status, len(raw))
    shown = json.dumps(json.loads(raw), ensure_ascii=False)
    echoed = [s for s in sent_strings if len(s) >= MIN_ECHO and s in shown and s not in OWN_WORDS]
    assert not echoed, (status, echoed, shown[:500])


@FUZZ
@given(body=bodies)
def test_any_json_body_gets_a_bounded_non_echoing_answer(server, body):
    status, _, raw = http_exchange("POST", server.score_url, json.dumps(body), timeout=60)
    check_answer(status, raw, strings_in(body))


@FUZZ
@given(raw=st.binary(max_size=600) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_any_bytes_get_a_bounded_non_echoing_answer(server, raw):
    status, _, answer = http_exchange("POST", server.score_url, raw, timeout=60)
    sent = {raw.decode("utf-8", "replace")} | set(raw.decode("utf-8", "replace").split('"'))
    check_answer(status, answer, sent)


def test_worker_alive_and_healthy_after_fuzzing(server):
    assert server.healthy()
    assert server.log_path.read_text(encoding="utf-8", errors="replace").count("Booting worker") == 1, \
        "the worker was never restarted"
    status, _, raw = http_exchange("POST", server.score_url, json.dumps({"instruction": "still there?"}))
    assert status == 200 and "response" in json.loads(raw)
    log = [json.loads(line) for line in open(server.serve["log_path"], encoding="utf-8")]
    assert len(log) >= EXAMPLES and {record["status"] for record in log} <= {200, 400, 405, 413, 429, 503}
