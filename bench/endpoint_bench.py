"""Endpoint benchmark: latency, throughput and error rate of the scoring server under concurrency.

    python -m bench.endpoint_bench                       # starts azmlinfsrv on models/merged itself
    python -m bench.endpoint_bench --url http://127.0.0.1:5001/score   # an endpoint already running
    python -m bench.endpoint_bench --compare             # continuous vs static batching vs none vs 2 workers

For each concurrency level (deploy.bench.concurrency in params.yaml, default 1 4 8 16) it sends
deploy.bench.requests POST /score requests, that many clients at a time, each asking for
max_new_tokens tokens (deploy.bench.max_new_tokens) at temperature 0 with a different question
from the test split, and reports p50/p95 latency of the answered (200) requests (client side),
requests/s, output tokens/s, the shed requests (429 or 503 with Retry-After: the server's bounded
queue and deadline turning them away, serve.queue), the error rate (anything else), and the mean
input (prompt) and output (completion) tokens per request. The server it
starts has the response cache off, so every request is decoded: the figures measure the model and
the batching, not the cache. Results: metrics/endpoint_bench.json and a table on stdout.

Goal on the embedded default (CPU): zero errors, and requests/s at concurrency 8 at least 3x the
sequential (concurrency 1) rate.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FALLBACK_QUESTIONS = ["How do I submit an expense report?", "What is the PM job code?", "Who approves annual leave?",
                      "Where is the Dublin office?", "How do I book a meeting room?", "How do I reset my password?"]

VARIANTS = {
    # One worker process, request threads, batching in the scoring script (the default engine:
    # continuous batching, serve.batching.engine).
    "batching": {"workers": 1, "serve": {}},
    # The same server with the earlier engine: static batches run to their longest answer.
    "static": {"workers": 1, "serve": {"batching": {"engine": "static"}}},
    # Same server, batching off: requests are decoded one at a time.
    "no-batching": {"workers": 1, "serve": {"batching": {"max_batch": 1, "window_ms": 0}}},
    # The inference server's own scaling: two worker processes (two model copies), no batching.
    "workers-2": {"workers": 2, "serve": {"batching": {"max_batch": 1, "window_ms": 0}, "threads": 1}},
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = (len(ordered) - 1) * q
    low, high = int(index), min(int(index) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (index - low)


def questions(data_dir: Path, count: int) -> list[str]:
    for name in ("test.jsonl", "val.jsonl"):
        path = data_dir / name
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            found = [row["instruction"] for row in rows if row.get("instruction")]
            if found:
                return [found[i % len(found)] for i in range(count)]
    return [FALLBACK_QUESTIONS[i % len(FALLBACK_QUESTIONS)] for i in range(count)]


def one_request(url: str, instruction: str, max_new_tokens: int) -> dict:
    from stages.deploy import http_exchange

    body = json.dumps({"instruction": instruction, "max_new_tokens": max_new_tokens, "temperature": 0})
    started = time.perf_counter()
    headers = {}
    try:
        status, headers, raw = http_exchange("POST", url, body, timeout=300)
        answer = json.loads(raw) if status == 200 else None
    except Exception as exc:  # a refused connection or a timeout is an error, not a crash of the benchmark
        status, answer = f"{type(exc).__name__}", None
    latency_ms = (time.perf_counter() - started) * 1000
    ok = status == 200 and isinstance(answer, dict) and "response" in answer
    shed = status in (429, 503) and "retry-after" in headers
    return {"ok": ok, "shed": shed, "status": status, "latency_ms": latency_ms,
            "prompt_tokens": answer.get("prompt_tokens") if ok else None,
            "completion_tokens": answer.get("completion_tokens") if ok else None,
            "server_ms": answer.get("response_time_ms") if ok else None}


def run_level(url: str, prompts: list[str], concurrency: int, max_new_tokens: int) -> dict:
    started = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=concurrency)
    try:
        results = list(pool.map(lambda q: one_request(url, q, max_new_tokens), prompts))
    finally:  # Ctrl-C: drop the queued requests instead of waiting for them
        pool.shutdown(wait=False, cancel_futures=True)
    wall = time.perf_counter() - started
    good = [r for r in results if r["ok"]]
    shed = [r for r in results if r["shed"]]
    errors = len(results) - len(good) - len(shed)
    latencies = [r["latency_ms"] for r in good]
    output_tokens = sum(r["completion_tokens"] for r in good)
    return {
        "concurrency": concurrency, "requests": len(results), "answered": len(good), "shed": len(shed),
        "shed_statuses": sorted({str(r["status"]) for r in shed}), "errors": errors,
        "error_rate": errors / len(results), "wall_s": round(wall, 3),
        "requests_per_s": round(len(good) / wall, 3), "output_tokens_per_s": round(output_tokens / wall, 1),
        "latency_p50_ms": round(percentile(latencies, 0.50), 1), "latency_p95_ms": round(percentile(latencies, 0.95), 1),
        "latency_mean_ms": round(statistics.fmean(latencies), 1) if latencies else None,
        "server_time_p50_ms": round(percentile([r["server_ms"] for r in good], 0.50), 1) if good else None,
        "input_tokens_mean": round(statistics.fmean(r["prompt_tokens"] for r in good), 1) if good else None,
        "output_tokens_mean": round(statistics.fmean(r["completion_tokens"] for r in good), 1) if good else None,
        "error_statuses": sorted({str(r["status"]) for r in results if not r["ok"] and not r["shed"]}),
    }


def benchmark(url: str, levels: list[int], requests: int, max_new_tokens: int, data_dir: Path,
              warmup: int = 4) -> dict:
    prompts = questions(data_dir, requests)
    for question in prompts[:warmup]:
        one_request(url, question, max_new_tokens)
    results = []
    for concurrency in levels:
        level = run_level(url, prompts, concurrency, max_new_tokens)
        print(f"  concurrency {concurrency:>3}: {level['requests_per_s']:.2f} req/s, p50 {level['latency_p50_ms']:.0f} ms, "
              f"p95 {level['latency_p95_ms']:.0f} ms, shed {level['shed']}, errors {level['errors']}", flush=True)
        results.append(level)
    by_level = {level["concurrency"]: level for level in results}
    sequential = by_level.get(1, {}).get("requests_per_s")
    speedups = {str(c): round(level["requests_per_s"] / sequential, 2) for c, level in by_level.items()
                if sequential}
    errors = sum(level["errors"] for level in results)
    goal = None
    if sequential and 8 in by_level:
        goal = {"zero_errors": errors == 0, "speedup_c8": speedups["8"], "speedup_c8_at_least_3x": speedups["8"] >= 3.0,
                "met": errors == 0 and speedups["8"] >= 3.0}
    return {"levels": results, "speedup_vs_sequential": speedups, "errors": errors, "goal": goal}


def machine() -> dict:
    import os

    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def table(result: dict) -> str:
    lines = ["| concurrency | requests | shed (429/503) | errors | req/s | x sequential | p50 ms | p95 ms | output tok/s | in tok | out tok |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for level in result["levels"]:
        speedup = result["speedup_vs_sequential"].get(str(level["concurrency"]), float("nan"))
        lines.append(f"| {level['concurrency']} | {level['requests']} | {level['shed']} | {level['errors']} | {level['requests_per_s']:.2f} | "
                     f"{speedup:.2f} | {level['latency_p50_ms']:.0f} | {level['latency_p95_ms']:.0f} | "
                     f"{level['output_tokens_per_s']:.0f} | {level['input_tokens_mean']} | {level['output_tokens_mean']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from stages.core import cli
    from stages.core.io import write_json
    from stages.core.params import load_params

    parser = argparse.ArgumentParser(prog="python -m bench.endpoint_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="score URL of a running endpoint (default: start azmlinfsrv on --model)")
    parser.add_argument("--model", default="models/merged")
    parser.add_argument("--data", default="data/processed", help="questions come from its test split")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--concurrency", type=int, nargs="+", help="override deploy.bench.concurrency")
    parser.add_argument("--requests", type=int, help="override deploy.bench.requests")
    parser.add_argument("--max-new-tokens", type=int, help="override deploy.bench.max_new_tokens")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="batching")
    parser.add_argument("--compare", action="store_true", help="run every variant (batching, static, no-batching, workers-2)")
    parser.add_argument("--torch-threads", type=int, help="override serve.torch_threads of the started server")
    parser.add_argument("--output", default="metrics/endpoint_bench.json")
    args = parser.parse_args(argv)

    def work():
        from stages.deploy import LocalServer

        params = load_params(args.params)
        bench = params.deploy.bench
        levels = args.concurrency or bench.concurrency
        requests = args.requests or bench.requests
        max_new_tokens = args.max_new_tokens or bench.max_new_tokens
        report = {"workload": {"requests_per_level": requests, "max_new_tokens": max_new_tokens, "temperature": 0,
                               "questions": str(args.data)}, "machine": machine(), "variants": {}}
        if args.url:
            print(f"benchmarking {args.url}", flush=True)
            report["url"] = args.url
            report["variants"]["external"] = benchmark(args.url, levels, requests, max_new_tokens, Path(args.data))
        else:
            for name in (sorted(VARIANTS, key=list(VARIANTS).index) if args.compare else [args.variant]):
                variant = VARIANTS[name]
                serve = merge(params.serve.model_dump(), {"cache": {"enabled": False}, "log_path": "", **variant["serve"]})
                if args.torch_threads is not None:
                    serve["torch_threads"] = args.torch_threads
                print(f"variant {name}: workers {variant['workers']}, threads {serve['threads']}, "
                      f"batching max {serve['batching']['max_batch']}, engine {serve['batching'].get('engine')}", flush=True)
                with LocalServer(args.model, serve, host="127.0.0.1", port=0, workers=variant["workers"],
                                 readiness_timeout_s=params.deploy.readiness_timeout_s) as server:
                    result = benchmark(server.score_url, levels, requests, max_new_tokens, Path(args.data))
                result["server"] = {"workers": variant["workers"], "threads": serve["threads"],
                                    "batching": serve["batching"], "torch_threads": serve["torch_threads"],
                                    "cache": "off", "server": "azmlinfsrv"}
                report["variants"][name] = result
            card = Path(args.model) / "card.json"
            if card.is_file():
                model = json.loads(card.read_text(encoding="utf-8"))["model"]
                report["model"] = {k: model.get(k) for k in ("base", "method", "dtype", "parameters")}
        main_variant = next(iter(report["variants"].values())) if args.url else report["variants"].get(
            "batching", next(iter(report["variants"].values())))
        report["goal"] = main_variant.get("goal")
        write_json(args.output, report)
        for name, result in report["variants"].items():
            print(f"\n{name} ({report['workload']['max_new_tokens']} new tokens max, temperature 0):\n{table(result)}")
        if report["goal"]:
            print(f"\ngoal (zero errors, >= 3x sequential at concurrency 8): "
                  f"{'met' if report['goal']['met'] else 'NOT met'} ({report['goal']['speedup_c8']}x)")
        print(f"wrote {args.output}")
        return 0 if main_variant["errors"] == 0 else 1

    return cli.run(work, "endpoint_bench")


if __name__ == "__main__":
    sys.exit(main())
