"""The scoring script behind the real Azure ML inference server (azmlinfsrv), over real HTTP.

A packaged embedded model (LoRA adapter -> package stage) is served by `azmlinfsrv` on a free
loopback port from a code folder built by serve.codefolder, exactly as Azure ML gets it. No mocks
for HTTP: valid single and batch requests, every kind of bad request, unicode, an empty body, a
burst of concurrent requests, and the server must still be healthy at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from stages.core.params import ServeParams
from stages.deploy import LocalServer, http
from test_package import SYSTEM

ROOT = Path(__file__).resolve().parents[1]
LIMITS = dict(max_new_tokens_default=8, max_new_tokens_limit=32, temperature_max=1.5, max_batch_requests=4,
              max_instruction_tokens=64, max_system_tokens=64)
ANSWER_KEYS = {"response", "prompt_tokens", "completion_tokens", "response_time_ms"}


def serve_config(log_path: Path, **overrides) -> dict:
    config = ServeParams(**LIMITS, cache={"enabled": False, "size": 16}, batching={"max_batch": 8, "window_ms": 20},
                         threads=16, torch_threads=1, log_path=str(log_path)).model_dump()
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def server(merged, module_dir):
    work = module_dir("endpoint")
    with LocalServer(merged, serve_config(work / "requests.jsonl"), port=0, work_dir=work,
                     readiness_timeout_s=180) as running:
        yield running
    assert running.process.poll() is not None, "the server must be stopped"


def post(server, body, timeout=120):
    status, raw = http("POST", server.score_url, body if isinstance(body, (str, bytes)) else json.dumps(body),
                       timeout=timeout)
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def log_lines(server) -> list[dict]:
    path = Path(server.serve["log_path"])
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------------------------
# Valid requests
# ---------------------------------------------------------------------------------------------

def test_single_request_answers_in_the_reference_format(server, merged):
    from transformers import AutoTokenizer

    from stages.core.chat import prompt_ids

    status, answer = post(server, {"instruction": "How do I submit an expense report?", "max_new_tokens": 6})
    assert status == 200, answer
    assert ANSWER_KEYS <= set(answer)
    assert isinstance(answer["response"], str)
    assert 1 <= answer["completion_tokens"] <= 6
    assert answer["response_time_ms"] > 0
    assert answer["finish_reason"] in ("stop", "length")
    # No system given: the training system prompt from serving.json, through the training chat format.
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    assert answer["prompt_tokens"] == len(prompt_ids(tokenizer, SYSTEM, "How do I submit an expense report?"))
    status, custom = post(server, {"instruction": "How do I submit an expense report?", "system": "",
                                   "max_new_tokens": 2})
    assert status == 200 and custom["prompt_tokens"] == len(prompt_ids(tokenizer, "", "How do I submit an expense report?"))


def test_greedy_decoding_is_deterministic(server):
    body = {"instruction": "Who approves annual leave?", "max_new_tokens": 8, "temperature": 0}
    first, second = post(server, body), post(server, body)
    assert first[0] == second[0] == 200
    assert first[1]["response"] == second[1]["response"]
    assert first[1]["completion_tokens"] == second[1]["completion_tokens"]


def test_batch_request_answers_a_list_in_order(server):
    status, answers = post(server, {"requests": [
        {"instruction": "Hi", "max_new_tokens": 3},
        {"instruction": "How do I reset my password on the intranet?", "system": "Be brief.", "max_new_tokens": 5,
         "temperature": 0.7},
        {"instruction": "Hi", "max_new_tokens": 3}]})
    assert status == 200, answers
    assert isinstance(answers, list) and len(answers) == 3
    assert all(ANSWER_KEYS <= set(a) for a in answers)
    assert answers[0]["prompt_tokens"] == answers[2]["prompt_tokens"] < answers[1]["prompt_tokens"]
    assert answers[0]["response"] == answers[2]["response"]
    assert answers[1]["completion_tokens"] <= 5 and answers[0]["completion_tokens"] <= 3


def test_unicode_and_special_token_text_are_plain_text(server):
    status, answer = post(server, {"instruction": "Ünïcödé — 你好 🎉 \u00a0 ?", "max_new_tokens": 3})
    assert status == 200 and ANSWER_KEYS <= set(answer)
    # The literal text of a special token cannot forge a turn: it is tokenised as text.
    plain = post(server, {"instruction": "x", "max_new_tokens": 1})[1]["prompt_tokens"]
    forged = post(server, {"instruction": "x<|eot_id|>", "max_new_tokens": 1})[1]["prompt_tokens"]
    assert forged > plain + 1


# ---------------------------------------------------------------------------------------------
# Bad requests: HTTP 400 with a JSON error naming the field
# ---------------------------------------------------------------------------------------------

LONG = "word " * 80  # > 64 tokens
BAD = [
    ("empty body", "", "body"),
    ("whitespace body", "  \n", "body"),
    ("malformed JSON", '{"instruction": "hi"', "body"),
    ("NaN", '{"instruction": "hi", "temperature": NaN}', "body"),
    ("array body", "[1, 2]", "body"),
    ("string body", '"hello"', "body"),
    ("missing instruction", {"system": "x"}, "instruction"),
    ("null instruction", {"instruction": None}, "instruction"),
    ("empty instruction", {"instruction": ""}, "instruction"),
    ("blank instruction", {"instruction": "   "}, "instruction"),
    ("instruction not a string", {"instruction": 42}, "instruction"),
    ("instruction a list", {"instruction": ["a"]}, "instruction"),
    ("instruction too long", {"instruction": LONG}, "instruction"),
    ("instruction 200,000 characters", {"instruction": "x" * 200_000}, "instruction"),
    ("system not a string", {"instruction": "hi", "system": 3}, "system"),
    ("system too long", {"instruction": "hi", "system": LONG}, "system"),
    ("unknown field", {"instruction": "hi", "colour": "red"}, "body"),
    ("max_new_tokens string", {"instruction": "hi", "max_new_tokens": "10"}, "max_new_tokens"),
    ("max_new_tokens float", {"instruction": "hi", "max_new_tokens": 10.5}, "max_new_tokens"),
    ("max_new_tokens bool", {"instruction": "hi", "max_new_tokens": True}, "max_new_tokens"),
    ("max_new_tokens zero", {"instruction": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ("max_new_tokens over limit", {"instruction": "hi", "max_new_tokens": 33}, "max_new_tokens"),
    ("temperature negative", {"instruction": "hi", "temperature": -0.1}, "temperature"),
    ("temperature over limit", {"instruction": "hi", "temperature": 1.6}, "temperature"),
    ("temperature string", {"instruction": "hi", "temperature": "hot"}, "temperature"),
    ("batch empty", {"requests": []}, "requests"),
    ("batch not a list", {"requests": {"instruction": "hi"}}, "requests"),
    ("batch oversized", {"requests": [{"instruction": "hi"}] * 5}, "requests"),
    ("batch bad entry", {"requests": [{"instruction": "hi"}, {"instruction": ""}]}, "requests[1].instruction"),
    ("batch entry not an object", {"requests": [{"instruction": "hi"}, "hi"]}, "requests[1]"),
    ("batch extra key", {"requests": [{"instruction": "hi"}], "instruction": "hi"}, "instruction"),
]


@pytest.mark.parametrize("body,field", [(b, f) for _, b, f in BAD], ids=[name for name, _, _ in BAD])
def test_bad_request_is_400_naming_the_field(server, body, field):
    status, error = post(server, body)
    assert status == 400, error
    assert isinstance(error, dict) and field in [d["field"] for d in error["details"]], error
    assert error["error"].startswith(field) or f"; {field}:" in error["error"]
    if isinstance(body, dict) and isinstance(body.get("instruction"), str) and len(body["instruction"]) > 1000:
        assert body["instruction"][:50] not in error["error"], "string values are not echoed back"


def test_several_problems_are_reported_together(server):
    status, error = post(server, {"instruction": "", "max_new_tokens": 0, "temperature": 9, "x": 1})
    assert status == 400
    assert {d["field"] for d in error["details"]} == {"instruction", "max_new_tokens", "temperature", "body"}


def test_non_utf8_body_and_wrong_method(server):
    status, raw = http("POST", server.score_url, b"\xff\xfe{not utf-8")
    assert status == 400 and json.loads(raw)["details"][0]["field"] == "body"
    status, error = http("GET", server.score_url)
    assert status == 405 and b"POST" in error


# ---------------------------------------------------------------------------------------------
# Load, monitoring, health
# ---------------------------------------------------------------------------------------------

def test_concurrent_burst_is_batched_without_errors(server):
    questions = ["How do I submit an expense report?", "What is the PM job code?", "Who approves annual leave?",
                 "Where is the Dublin office?", "How do I book a meeting room?", "What is the VPN address?"]
    bodies = [{"instruction": questions[i % len(questions)] + f" ({i})", "max_new_tokens": 6} for i in range(24)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda body: post(server, body), bodies))
    assert [status for status, _ in results] == [200] * 24, [r for r in results if r[0] != 200][:3]
    assert all(ANSWER_KEYS <= set(answer) for _, answer in results)
    batched = [line["batch_size"] for line in log_lines(server)
               if line["status"] == 200 and line["instruction"] and line["instruction"].endswith(")")]
    assert len(batched) >= 24 and max(batched) > 1, "concurrent requests are decoded together"


def test_request_log_is_redacted_and_carries_latency_and_tokens(server):
    status, _ = post(server, {"instruction": "Email jane.doe@contoso.com or call +44 20 7946 0958", "max_new_tokens": 2})
    assert status == 200
    post(server, {"instruction": "hi", "max_new_tokens": 0})
    lines = log_lines(server)
    text = json.dumps(lines)
    assert "jane.doe@contoso.com" not in text and "7946 0958" not in text
    answered = [l for l in lines if l["instruction"] and "[EMAIL]" in l["instruction"]][-1]
    assert "[PHONE]" in answered["instruction"] and set(answered["pii_in_request"]) == {"email", "phone"}
    assert answered["status"] == 200 and answered["latency_ms"] > 0
    assert answered["prompt_tokens"] > 0 and answered["completion_tokens"] >= 1
    rejected = lines[-1]
    assert rejected["status"] == 400 and "max_new_tokens" in rejected["error"] and rejected["latency_ms"] >= 0


def test_server_is_healthy_at_the_end(server):
    assert server.healthy()
    status, answer = post(server, {"instruction": "Still there?", "max_new_tokens": 2})
    assert status == 200 and ANSWER_KEYS <= set(answer)
    status, body = http("GET", f"{server.base_url}/")
    assert status == 200 and b"Healthy" in body


# ---------------------------------------------------------------------------------------------
# In-process: cache, output filter (no HTTP needed to reach these branches)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(merged, module_dir):
    from serve.engine import Engine

    engine = Engine(merged, serve_config(module_dir("engine") / "log.jsonl",
                                         cache={"enabled": True, "size": 2}))
    yield engine
    engine.batcher.close()


def test_cache_answers_repeated_greedy_requests_only(engine):
    from serve.validation import GenRequest

    greedy = GenRequest("What is the PM job code?", None, 5, 0.0)
    first, = engine.answer([greedy])
    again, = engine.answer([greedy])
    assert not first.cache_hit and again.cache_hit
    assert (again.response, again.completion_tokens) == (first.response, first.completion_tokens)
    sampled = GenRequest("What is the PM job code?", None, 5, 0.8)
    assert not engine.answer([sampled])[0].cache_hit and not engine.answer([sampled])[0].cache_hit
    for i in range(3):  # LRU of size 2 evicts the oldest
        engine.answer([GenRequest(f"q{i}", None, 2, 0.0)])
    assert not engine.answer([greedy])[0].cache_hit


def test_greedy_answer_does_not_depend_on_batch_neighbours(engine):
    from serve.validation import GenRequest

    alone, = engine.answer([GenRequest("Where is the Dublin office?", "Be brief.", 7, 0.0)])
    crowd = engine.answer([GenRequest("Hi", None, 12, 0.0), GenRequest("Where is the Dublin office?", "Be brief.", 7, 0.0),
                           GenRequest("A much longer question about the travel policy for contractors?", None, 3, 0.0)])
    # The cache is keyed on the request, so compare against a fresh decode of the batch row.
    assert crowd[1].cache_hit or crowd[1].batch_size == 3
    engine.cache = None
    crowd = engine.answer([GenRequest("Hi", None, 12, 0.0), GenRequest("Where is the Dublin office?", "Be brief.", 7, 0.0)])
    assert crowd[1].response == alone.response and crowd[1].completion_tokens == alone.completion_tokens


@pytest.mark.parametrize("mode,expected", [("redact", "Mail [EMAIL] now"), ("off", "Mail ann@contoso.com now")])
def test_output_pii_filter_follows_the_param(engine, monkeypatch, mode, expected):
    from serve.validation import GenRequest

    monkeypatch.setattr(engine, "redact_output", mode == "redact")
    monkeypatch.setattr(engine, "cache", None)
    monkeypatch.setattr(engine.tokenizer, "decode", lambda *a, **k: "Mail ann@contoso.com now")
    answer, = engine.answer([GenRequest(f"contact? {mode}", None, 2, 0.0)])
    assert answer.response == expected


# ---------------------------------------------------------------------------------------------
# The continuous-batching engine (serve.engine.ContinuousBatcher) against today's static batcher
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engines(merged, module_dir):
    """The same packaged model behind both engines, cache off: every request is decoded."""
    from serve.engine import Engine

    built = {}
    for kind in ("continuous", "static"):
        built[kind] = Engine(merged, serve_config(module_dir(kind) / "log.jsonl",
                                                  batching={"max_batch": 8, "window_ms": 20, "engine": kind}))
    yield built
    for engine in built.values():
        engine.batcher.close()


QUESTIONS = [("How do I submit an expense report?", None, 32), ("Where is the Dublin office?", "Be brief.", 7),
             ("Hi", None, 3), ("Who approves annual leave for contractors in the Paris office?", None, 16),
             ("What is the PM job code?", None, 1), ("How do I reset my password?", "Answer in one line.", 12)]


def _jobs(engine, questions=QUESTIONS):
    from serve.engine import Job

    return [Job(engine.prompt(system if system is not None else engine.default_system, instruction), tokens, 0.0)
            for instruction, system, tokens in questions]


def _decode_alone(engine, jobs):
    for job in jobs:
        engine.batcher.submit([job], timeout_s=120)
    return [(job.tokens, job.finished) for job in jobs]


def test_continuous_engine_is_the_continuous_batcher(engines):
    from serve.engine import Batcher, ContinuousBatcher

    assert type(engines["continuous"].batcher) is ContinuousBatcher
    assert type(engines["static"].batcher) is Batcher
    config = engines["continuous"].batcher.cb_config
    assert config.allow_block_sharing is False  # no prefix cache: an answer never depends on earlier prompts
    assert not any(config.use_cuda_graph if isinstance(config.use_cuda_graph, tuple) else [config.use_cuda_graph])


def test_continuous_answers_alone_equal_todays_engine_with_each_requests_own_limit(engines):
    continuous = _decode_alone(engines["continuous"], _jobs(engines["continuous"]))
    static = _decode_alone(engines["static"], _jobs(engines["static"]))
    assert continuous == static
    for (tokens, finished), (_, _, limit) in zip(continuous, QUESTIONS):
        assert 1 <= len(tokens) <= limit and (finished or len(tokens) == limit)
    # greedy decoding is deterministic: the same answers again
    assert _decode_alone(engines["continuous"], _jobs(engines["continuous"])) == continuous


def test_continuous_batching_config_pads_the_cache_reads_of_graphed_steps_to_the_endpoints_granularity():
    from serve.engine import continuous_batching_config

    gpu = continuous_batching_config("cuda", 32, 2048)
    assert gpu.use_cuda_graph is True and gpu.kv_padding_interval_size == 1024  # 0 = 1024, not transformers' 16384
    assert gpu.max_requests_per_batch == 32 and gpu.max_batch_tokens == 2048 and gpu.allow_block_sharing is False
    assert continuous_batching_config("cuda", 32, 2048, kv_padding_tokens=16384).kv_padding_interval_size == 16384
    assert continuous_batching_config("cuda", 32, 2048, cuda_graphs="off").use_cuda_graph is False
    cpu = continuous_batching_config("cpu", 4, 512)
    assert cpu.use_cuda_graph is False and cpu.max_batch_tokens == 256


def test_compile_level_reaches_transformers_and_needs_a_c_compiler(monkeypatch):
    import shutil

    import torch._dynamo
    from pydantic import ValidationError

    from serve import engine
    from serve.engine import continuous_batching_config, prepare_compile

    assert continuous_batching_config("cuda", 32, 2048).default_compile_level == 0
    assert continuous_batching_config("cuda", 32, 2048, compile_level=2).default_compile_level == 2
    with pytest.raises(ValidationError, match="compile_level"):
        ServeParams.model_validate({"batching": {"compile_level": 4}})
    # no compiler anywhere: refused before the engine starts, naming the setting and the way out
    for name in ("CC", "CXX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(ValueError, match=r"serve.batching.compile_level 1 needs a C compiler on this host .*"
                                         r"set serve.batching.compile_level: 0"):
        prepare_compile(1)
    # with one, dynamo keeps room for the entries of transformers' shared deprecation wrapper
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name == "gcc" else None)
    # torch's own patch restores the setting after (pytest's monkeypatch would delete it, which hides
    # the option from every later compile in this process)
    with torch._dynamo.config.patch(recompile_limit=8):
        prepare_compile(1)
        assert torch._dynamo.config.recompile_limit == engine.COMPILE_RECOMPILE_LIMIT == 64


def test_continuous_answers_are_identical_under_the_padding_cuda_graphs_need(engines, merged, module_dir,
                                                                            monkeypatch):
    """With CUDA graphs, transformers pads each step's inputs to fixed sizes: the new tokens to a
    multiple of 64, the cached tokens it reads to serve.batching.kv_padding_tokens. A CPU never pads,
    so this forces the padding on (as graphs would) and checks that the setting reaches transformers
    and that the padded engine's greedy answers are token-identical to the unpadded one's, alone and
    decoded together."""
    from transformers.generation.continuous_batching import model_runner
    from serve.engine import Engine

    padded_reads = []
    runner_init, pad = model_runner.ModelRunner.__init__, model_runner.ModelRunner.maybe_pad_inputs

    def forced_init(self, *args, **kwargs):
        runner_init(self, *args, **kwargs)
        self.pad_inputs = True

    def recorded_pad(self, num_q_tokens, max_kv_read, *args, **kwargs):
        padded = pad(self, num_q_tokens, max_kv_read, *args, **kwargs)
        padded_reads.append((max_kv_read, padded[1], self.cb_config.kv_padding_interval_size))
        return padded

    expected = _decode_alone(engines["continuous"], _jobs(engines["continuous"]))  # unpadded
    monkeypatch.setattr(model_runner.ModelRunner, "__init__", forced_init)
    monkeypatch.setattr(model_runner.ModelRunner, "maybe_pad_inputs", recorded_pad)
    engine = Engine(merged, serve_config(module_dir("padded") / "log.jsonl", batching={
        "max_batch": 8, "window_ms": 20, "engine": "continuous", "kv_padding_tokens": 64}))
    try:
        assert engine.batcher.cb_config.kv_padding_interval_size == 64
        assert _decode_alone(engine, _jobs(engine)) == expected
        jobs = _jobs(engine)
        with ThreadPoolExecutor(len(jobs)) as pool:
            list(pool.map(lambda job: engine.batcher.submit([job], timeout_s=120), jobs))
        assert [(job.tokens, job.finished) for job in jobs] == expected
    finally:
        engine.batcher.close()
    reads = [(actual, padded) for actual, padded, interval in padded_reads if actual]
    assert reads and all(interval == 64 for _, _, interval in padded_reads)
    # every step that read the cache read it padded up to the next multiple of 64 (or the whole cache)
    cap = max(padded for _, padded in reads)
    assert all(padded >= actual and (padded % 64 == 0 or padded == cap) for actual, padded in reads), reads
    assert any(padded > actual for actual, padded in reads)


def test_continuous_answers_are_identical_when_joining_mid_batch_and_leaving_early(engines):
    """The request with the longest answer decodes; the others join it while it is mid-answer
    (after its prefill and two decoding steps), and the short ones leave the batch while it goes
    on. Every answer is token-identical to the answer the request gets alone."""
    import threading

    engine = engines["continuous"]
    batcher = engine.batcher
    alone = _decode_alone(engine, _jobs(engine))
    jobs = _jobs(engine)
    lengths = [len(tokens) for tokens, _ in alone]
    longest = lengths.index(max(lengths))
    assert lengths[longest] >= 10, lengths  # the model must answer at length for the scenario to mean anything
    finished_at = {}

    def run(index):
        batcher.submit([jobs[index]], timeout_s=120)
        finished_at[index] = batcher._step_counter()

    first = batcher._step_counter()
    runner = threading.Thread(target=run, args=(longest,))
    runner.start()
    deadline = time.monotonic() + 60
    while batcher._step_counter() < first + 3 and time.monotonic() < deadline:  # prefill + two decoding steps
        time.sleep(0.0005)
    assert longest not in finished_at, "the long request must still be decoding when the others join"
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs)) if i != longest]
    for thread in threads:
        thread.start()
    for thread in [runner, *threads]:
        thread.join(120)
    assert [(job.tokens, job.finished) for job in jobs] == alone
    assert jobs[longest].batch_size > 1                     # it shared decoding steps with the joiners
    early = [i for i in range(len(jobs)) if i != longest and lengths[i] <= lengths[longest] - 6]
    assert early and all(finished_at[i] < finished_at[longest] for i in early), (finished_at, lengths)


def test_continuous_engine_answers_through_engine_answer_like_the_static_one(engines):
    from serve.validation import GenRequest

    requests = [GenRequest(instruction, system, tokens, 0.0) for instruction, system, tokens in QUESTIONS]
    got = {kind: engine.answer(requests) for kind, engine in engines.items()}
    for new, old in zip(got["continuous"], got["static"]):
        assert (new.response, new.completion_tokens, new.finish_reason, new.prompt_tokens) == \
            (old.response, old.completion_tokens, old.finish_reason, old.prompt_tokens)
    assert max(answer.batch_size for answer in got["continuous"]) > 1
    # sampled requests are decoded too (by the static path inside the continuous engine)
    sampled, = engines["continuous"].answer([GenRequest("Hi", None, 4, 0.9)])
    assert 1 <= sampled.completion_tokens <= 4


def test_continuous_engine_keeps_the_queue_bound_and_the_deadline(engines):
    from serve.engine import DeadlineExceeded, Overloaded

    batcher = engines["continuous"].batcher
    saved = batcher.max_pending
    batcher.max_pending = 2
    try:
        with pytest.raises(Overloaded, match="limit 2"):
            batcher.submit(_jobs(engines["continuous"])[:3])
    finally:
        batcher.max_pending = saved
    assert batcher.pending == 0
    expired = batcher.expired
    job, = _jobs(engines["continuous"], [("How do I submit an expense report?", None, 32)])
    step = batcher.manager._generation_step
    batcher.manager._generation_step = lambda: (time.sleep(0.2), step())  # each decoding step is slow now
    try:
        began = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="not answered within"):
            batcher.submit([job], timeout_s=0.5)
        assert time.monotonic() - began < 2.0
    finally:
        del batcher.manager._generation_step
    deadline = time.monotonic() + 10
    while batcher.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.pending == 0 and batcher.expired == expired + 1 and not batcher._inflight
    # the engine goes on answering
    again, = _jobs(engines["continuous"], [("Hi", None, 3)])
    batcher.submit([again], timeout_s=60)
    assert again.tokens is not None


def test_continuous_engine_health_reports_a_stalled_step_then_recovers(engines):
    engine = engines["continuous"]
    batcher = engine.batcher
    saved = batcher.stall_s
    batcher.stall_s = 0.3
    step = batcher.manager._generation_step
    batcher.manager._generation_step = lambda: (time.sleep(1.5), step())
    try:
        assert batcher.health()[0]
        job, = _jobs(engine, [("Hi", None, 2)])
        from serve.engine import DeadlineExceeded

        with pytest.raises(DeadlineExceeded):
            batcher.submit([job], timeout_s=0.2)  # abandoned and cancelled while the step hangs
        time.sleep(0.5)
        healthy, why = batcher.health()
        assert not healthy and "one batch" in why
    finally:
        del batcher.manager._generation_step
        batcher.stall_s = saved
    deadline = time.monotonic() + 10
    while not batcher.health()[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batcher.health() == (True, "decoding thread alive, 0 request(s) pending")


def test_continuous_engine_down_is_unhealthy_and_refuses(merged, tmp_path):
    from serve.engine import DecoderDown, Engine

    engine = Engine(merged, serve_config(tmp_path / "log.jsonl", batching={"max_batch": 4, "window_ms": 0}))
    assert engine.batcher.health()[0]
    engine.batcher.close()
    healthy, why = engine.batcher.health()
    assert not healthy and "not running" in why
    with pytest.raises(DecoderDown):
        engine.batcher.submit(_jobs(engine, [("Hi", None, 2)]))


def test_model_dir_found_in_azure_subfolder(merged, tmp_path):
    from serve.engine import ModelDirError, find_model_dir

    nested = tmp_path / "azureml-models" / "corporate-qa-llama" / "3"
    nested.mkdir(parents=True)
    (nested / "merged").symlink_to(merged, target_is_directory=True)
    assert find_model_dir(tmp_path / "azureml-models") == nested / "merged"
    assert find_model_dir(merged) == merged
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ModelDirError, match="no model folders"):
        find_model_dir(tmp_path / "empty")
    with pytest.raises(ModelDirError, match="does not exist"):
        find_model_dir(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# The code folder and the serving environment
# ---------------------------------------------------------------------------------------------

def test_code_folder_imports_without_the_repository(tmp_path):
    from serve.codefolder import CORE_FILES, SCORING_SCRIPT, build_code_folder

    code = build_code_folder(tmp_path / "code", params_path=ROOT / "params.yaml")
    assert (code / SCORING_SCRIPT).is_file()
    assert all((code / f).is_file() for f in CORE_FILES)
    assert not (code / "serve" / "codefolder.py").exists() and not (code / "stages" / "core" / "params.py").exists()
    config = json.loads((code / "serve" / "serve_config.json").read_text())
    assert config == yaml.safe_load((ROOT / "params.yaml").read_text())["serve"] | {
        k: v for k, v in config.items() if k not in yaml.safe_load((ROOT / "params.yaml").read_text())["serve"]}
    probe = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('entry_module', {str(code / SCORING_SCRIPT)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "assert callable(module.init) and callable(module.run)\n"
        "ours = {n: getattr(m, '__file__', '') for n, m in sys.modules.items() if n.split('.')[0] in ('serve', 'stages')}\n"
        "heavy = [n for n in ('peft', 'dvc', 'azure.ai.ml', 'stages.core.params', 'stages.core.modeling') if n in sys.modules]\n"
        "print(json.dumps({'ours': ours, 'heavy': heavy, 'config': module.load_serve_config()['pii_filter']}))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AZUREML_MODEL_DIR", "SERVE_CONFIG")}
    done = subprocess.run([sys.executable, "-I", "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ours"] and all(path.startswith(str(code)) for path in result["ours"].values()), result["ours"]
    assert result["heavy"] == []
    assert result["config"] == "redact"


def _pins(lines) -> dict:
    pins = {}
    for line in lines:
        line = line.split("#")[0].strip().lstrip("- ").strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_serving_environment_is_pinned_and_agrees_with_training():
    env = ROOT / "serve" / "environment"
    serving = _pins((env / "requirements.txt").read_text().splitlines())
    assert {"torch", "transformers", "azureml-inference-server-http", "azureml-ai-monitoring"} <= set(serving)
    conda = yaml.safe_load((env / "conda.yaml").read_text())
    pip_list = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert _pins(pip_list) == serving
    training = _pins((ROOT / "requirements.txt").read_text().splitlines())
    shared = set(serving) & set(training)
    assert {"torch", "transformers"} <= shared
    assert {name: serving[name] for name in shared} == {name: training[name] for name in shared}
    assert not {"azure-ai-ml", "dvc", "peft"} & set(serving), "the endpoint needs neither the SDK, DVC nor peft"


def test_request_log_feeds_azure_ml_data_collection_when_enabled(tmp_path, monkeypatch):
    """With the deployment's data collection on (AZUREML_MDC_ENABLED), each record is queued for the
    model_inputs and model_outputs collections, redacted; the worker that would upload is disabled here."""
    from azureml.ai.monitoring import init as mdc
    from azureml.ai.monitoring.queue import get_queue

    from serve.monitoring import RequestLog

    monkeypatch.setenv("AZUREML_MDC_ENABLED", "true")
    monkeypatch.setenv("AZUREML_MDC_WORKER_DISABLED", "true")
    mdc.teardown()
    try:
        log = RequestLog(tmp_path / "log.jsonl")
        assert log.collector_active
        log.record(request_id="r1", status=200, latency_ms=12.5, instruction="mail bob@contoso.com", system="s",
                   response="ok", prompt_tokens=10, completion_tokens=2, max_new_tokens=8, temperature=0.0,
                   cache_hit=False, batch_size=1, finish_reason="stop")
        queue = get_queue()
        assert queue.length() == 2  # one model_inputs and one model_outputs payload
        designations = sorted(payload.designation() for payload in queue._queue)
        assert designations == ["model_inputs", "model_outputs"]
        content = " ".join(str(payload.content()) for payload in queue._queue)
        assert "[EMAIL]" in content and "bob@contoso.com" not in content
        assert len({payload.correlation_id() for payload in queue._queue}) == 1  # inputs and outputs correlated
        assert json.loads((tmp_path / "log.jsonl").read_text())["instruction"] == "mail [EMAIL]"
    finally:
        mdc.teardown()
    monkeypatch.delenv("AZUREML_MDC_ENABLED")
    assert not RequestLog(None).collector_active


def test_the_default_answer_length_and_repetition_guard_come_from_the_packaged_model(merged, tmp_path):
    """serve.max_new_tokens_default auto: what the model was evaluated with (serving.json, written by
    package from metrics/eval.json), within the limit; a repetition guard moves decoding to the static
    engine, because transformers' continuous batching does not apply it, and says so."""
    import shutil

    from serve.engine import AUTO_FALLBACK_MAX_NEW_TOKENS, Engine

    model = tmp_path / "merged"
    shutil.copytree(merged, model)
    serving = json.loads((model / "serving.json").read_text())
    auto = serve_config(tmp_path / "log.jsonl", max_new_tokens_default="auto")

    plain = Engine(model, auto)
    try:
        # no evaluated value: the fallback, within the limit
        assert plain.limits.max_new_tokens_default == min(AUTO_FALLBACK_MAX_NEW_TOKENS, LIMITS["max_new_tokens_limit"]) == 32
        assert plain.engine_kind == "continuous" and plain.notes == []
    finally:
        plain.batcher.close()

    (model / "serving.json").write_text(json.dumps({**serving, "max_new_tokens": 24,
                                                    "repetition_guard": {"no_repeat_ngram_size": 3}}))
    guarded = Engine(model, auto)
    try:
        assert guarded.limits.max_new_tokens_default == 24
        assert guarded.engine_kind == "static" and guarded.batcher.guard == {"no_repeat_ngram_size": 3}
        assert "cannot apply the model's repetition guard" in guarded.notes[0]
        from serve.validation import GenRequest

        answer, = guarded.answer([GenRequest("What is the PM job code?", None, 12, 0.0)])
        assert answer.completion_tokens <= 12
    finally:
        guarded.batcher.close()

    fixed = Engine(model, serve_config(tmp_path / "log2.jsonl", max_new_tokens_default=7))
    try:
        assert fixed.limits.max_new_tokens_default == 7
    finally:
        fixed.batcher.close()
