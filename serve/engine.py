"""The endpoint's model: loading, prompt building, dynamic batching, cache and output filter.

One Engine per server worker process holds one copy of the model. Request threads (the server
runs `serve.threads` of them) call `Engine.answer`, which builds each prompt with the training
chat format (stages.core.chat.prompt_ids), answers repeated greedy requests from an LRU cache and
queues the rest for a single decoding thread. That thread takes every request queued while the
model was busy (waiting up to `batching.window_ms` after the first one, up to
`batching.max_batch`) and decodes them together with stages.core.generate.generate_batch:
left-padded, KV-cached, one forward pass per new token for the whole batch. On a CPU or a GPU that
is what turns concurrent requests into throughput; one thread decoding also keeps torch from
oversubscribing the cores.

Greedy decoding (temperature 0) is deterministic; requests with different temperatures are decoded
in separate groups. Rows in a batch may ask for different max_new_tokens: the batch runs to the
largest and each answer is cut at its own limit, which for greedy decoding is exactly the answer
it would get alone.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stages.core.chat import chat_format
from stages.core.generate import generate_batch
from stages.core.pii import redact

from .validation import GenRequest, Limits, RequestError, parse_request

SERVING_METADATA = "serving.json"
REQUIRED_CONFIG = ("max_new_tokens_default", "max_new_tokens_limit", "temperature_max", "max_batch_requests",
                   "max_instruction_tokens", "max_system_tokens", "default_system", "pii_filter", "cache",
                   "batching", "threads", "log_path")


class ModelDirError(Exception):
    """AZUREML_MODEL_DIR does not hold exactly one packaged model."""


def find_model_dir(root: str | Path, max_depth: int = 4) -> Path:
    """The folder holding config.json and the weights: `root` itself or one folder below it.

    Azure ML mounts a registered model at AZUREML_MODEL_DIR, with the registered folder inside it
    (AZUREML_MODEL_DIR/merged/...) or, for some registrations, further down (<name>/<version>/...).
    """
    root = Path(root)
    if not root.is_dir():
        raise ModelDirError(f"model directory {root} does not exist (AZUREML_MODEL_DIR)")

    def is_model(path: Path) -> bool:
        return (path / "config.json").is_file() and (
            any(path.glob("*.safetensors")) or any(path.glob("*.bin")))

    if is_model(root):
        return root
    found, frontier = [], [root]
    for _ in range(max_depth):
        frontier = [child for folder in frontier for child in sorted(folder.iterdir()) if child.is_dir()]
        found = [folder for folder in frontier if is_model(folder)]
        if found:
            break
    if len(found) != 1:
        listing = ", ".join(str(p.relative_to(root)) for p in root.rglob("config.json"))[:500] or "none"
        what = "no" if not found else f"{len(found)}"
        raise ModelDirError(f"{what} model folders (config.json + weights) under {root}; config.json files: {listing}")
    return found[0]


class LRUCache:
    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
            return None

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


@dataclass(eq=False)
class Job:
    prompt: list[int]
    max_new_tokens: int
    temperature: float
    done: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] | None = None
    finished: bool = False
    batch_size: int = 0
    error: BaseException | None = None


class Batcher:
    """One decoding thread that batches the jobs queued while it was busy."""

    def __init__(self, model, max_batch: int, window_ms: float, fmt):
        self.model = model
        self.fmt = fmt  # the chat format: pad and stop ids
        self.max_batch = max(1, int(max_batch))
        self.window_s = max(0.0, float(window_ms)) / 1000.0
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self.batches = self.rows = 0
        self._thread = threading.Thread(target=self._loop, name="serve-batcher", daemon=True)
        self._thread.start()

    def submit(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._queue.put(job)
        for job in jobs:
            job.done.wait()
        for job in jobs:
            if job.error is not None:
                raise RuntimeError(f"generation failed: {job.error!r}") from job.error

    def close(self) -> None:
        self._queue.put(None)

    def _collect(self, first: Job) -> list[Job]:
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # shutdown: finish this batch first
                self._queue.put(None)
                break
            batch.append(job)
        return batch

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = self._collect(first)
            groups: dict[float, list[Job]] = {}
            for job in batch:
                groups.setdefault(job.temperature, []).append(job)
            for temperature, jobs in groups.items():
                try:
                    self._decode(jobs, temperature)
                except BaseException as exc:  # the thread must survive anything a batch does
                    for job in jobs:
                        job.error = exc
                finally:
                    for job in jobs:
                        job.done.set()

    def _decode(self, jobs: list[Job], temperature: float) -> None:
        longest = max(job.max_new_tokens for job in jobs)
        generations = generate_batch(self.model, [job.prompt for job in jobs], longest, self.fmt, temperature)
        self.batches += 1
        self.rows += len(jobs)
        for job, generation in zip(jobs, generations):
            tokens = generation.token_ids
            if len(tokens) > job.max_new_tokens:
                job.tokens, job.finished = tokens[:job.max_new_tokens], False
            else:
                job.tokens, job.finished = tokens, generation.finished
            job.batch_size = len(jobs)


@dataclass
class Answer:
    response: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str          # "stop" (ended with <|eot_id|>/<|end_of_text|>) or "length"
    cache_hit: bool
    batch_size: int             # requests decoded together (0 for a cache hit)
    system: str
    request: GenRequest


def check_config(config: dict) -> None:
    missing = [key for key in REQUIRED_CONFIG if key not in config]
    if missing:
        raise ValueError(f"serve config is missing {', '.join(missing)} (build it with serve.codefolder)")
    if config["pii_filter"] not in ("redact", "off"):
        raise ValueError(f"serve config: pii_filter must be 'redact' or 'off', got {config['pii_filter']!r}")


class Engine:
    def __init__(self, model_dir: str | Path, config: dict, device: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        check_config(config)
        if config.get("torch_threads"):
            torch.set_num_threads(int(config["torch_threads"]))
        self.config = config
        self.limits = Limits.from_config(config)
        self.model_dir = find_model_dir(model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        # The fast tokenizer may re-borrow its Rust state on a call ("Already borrowed" when two
        # request threads meet); encoding is cheap, so calls are serialised.
        self._tokenizer_lock = threading.Lock()
        # The chat format the model was trained with (Llama 3, or the tokenizer's own template).
        self.chat = chat_format(self.tokenizer)
        # Stored dtype on a GPU (bf16 for a real Llama); fp32 on a CPU, where bf16 kernels are slow.
        dtype = "auto" if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=dtype).to(self.device)
        self.model.eval()
        metadata_path = self.model_dir / SERVING_METADATA
        self.metadata = json.loads(metadata_path.read_text(encoding="utf-8")) if metadata_path.is_file() else {}
        self.default_system = config["default_system"] or self.metadata.get("default_system", "")
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)
        self.redact_output = config["pii_filter"] == "redact"
        cache = config["cache"]
        self.cache = LRUCache(int(cache["size"])) if cache["enabled"] else None
        batching = config["batching"]
        self.batcher = Batcher(self.model, batching["max_batch"], batching["window_ms"], self.chat)
        # Warm-up: the first forward pass allocates and picks kernels; keep that off the first request.
        self.batcher.submit([Job(self.chat.prompt_ids(self.default_system, "Hello"), 2, 0.0)])

    def count_tokens(self, text: str) -> int:
        with self._tokenizer_lock:
            return len(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def prompt(self, system: str, instruction: str) -> list[int]:
        with self._tokenizer_lock:
            return self.chat.prompt_ids(system, instruction)

    def decode(self, tokens: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def parse(self, raw) -> tuple[list[GenRequest], bool]:
        return parse_request(raw, self.limits, self.count_tokens)

    def answer(self, requests: list[GenRequest], is_batch: bool = False) -> list[Answer]:
        prompts, problems = [], []
        for index, request in enumerate(requests):
            system = self.default_system if request.system is None else request.system
            prompt = self.prompt(system, request.instruction)
            if self.context_length and len(prompt) + request.max_new_tokens > self.context_length:
                where = f"requests[{index}].max_new_tokens" if is_batch else "max_new_tokens"
                problems.append((where, f"prompt ({len(prompt)} tokens) + max_new_tokens ({request.max_new_tokens}) "
                                        f"exceeds the model's context of {self.context_length} tokens"))
            prompts.append((system, prompt))
        if problems:
            raise RequestError(problems)

        answers: list[Answer | None] = [None] * len(requests)
        jobs: dict[int, Job] = {}
        for index, (request, (system, prompt)) in enumerate(zip(requests, prompts)):
            key = (system, request.instruction, request.max_new_tokens)
            cached = self.cache.get(key) if self.cache is not None and request.temperature == 0 else None
            if cached is not None:
                response, completion_tokens, finish_reason = cached
                answers[index] = Answer(response, len(prompt), completion_tokens, finish_reason, True, 0,
                                        system, request)
            else:
                jobs[index] = Job(prompt, request.max_new_tokens, request.temperature)
        if jobs:
            self.batcher.submit(list(jobs.values()))
        for index, job in jobs.items():
            request = requests[index]
            system, prompt = prompts[index]
            text = self.decode(job.tokens)
            if self.redact_output:
                text, _ = redact(text)
            finish_reason = "stop" if job.finished else "length"
            if self.cache is not None and request.temperature == 0:
                self.cache.put((system, request.instruction, request.max_new_tokens),
                               (text, len(job.tokens), finish_reason))
            answers[index] = Answer(text, len(prompt), len(job.tokens), finish_reason, False, job.batch_size,
                                    system, request)
        return answers
