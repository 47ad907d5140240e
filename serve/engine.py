"""The endpoint's model: loading, prompt building, continuous batching, cache and output filter.

One Engine per server worker process holds one copy of the model. Request threads (the server
runs `serve.threads` of them) call `Engine.answer`, which builds each prompt with the training
chat format (stages.core.chat.prompt_ids), answers repeated greedy requests from an LRU cache and
hands the rest to the batcher (`serve.batching.engine`):

- `continuous` (ContinuousBatcher, the default): greedy requests go to transformers' continuous
  batching (`model.init_continuous_batching()`, `add_request` / `get_result`; a paged KV cache,
  one background decoding thread). A request joins the running batch at the next decoding step
  and leaves it the moment it is done, so a short answer never waits for a long neighbour and a
  new request never waits for a whole batch to end. Sampled requests (temperature > 0) are decoded
  by the static path below, in separate groups per temperature.
- `static` (Batcher): one decoding thread takes every request queued while the model was busy
  (waiting up to `batching.window_ms` after the first one, up to `batching.max_batch`) and decodes
  them together with stages.core.generate.generate_batch, left-padded, to the longest answer.

The queue is bounded and every request has a deadline, both enforced here rather than by the
server (azmlinfsrv's SCORING_TIMEOUT_MS uses SIGALRM, which never fires in a threaded worker):
- more than `queue.max_pending` requests queued or decoding: Overloaded (the script answers 429
  with Retry-After, as Azure ML's front end does above max_concurrent_requests_per_instance);
- not answered within `request_timeout_s`: DeadlineExceeded (503 with Retry-After); a job whose
  deadline passed while it was queued is dropped without decoding (the continuous engine cancels
  it, queued or decoding, and frees its cache pages);
- `health()` is unhealthy when a decoding thread has died, or has made no progress for longer
  than `stall_s` while requests were waiting (the liveness route reports it; Azure ML then
  restarts the container).

Greedy decoding (temperature 0) is deterministic, and each answer is cut at its own
max_new_tokens: the continuous engine gives each request its own limit; the static one runs a
batch to the largest and cuts each row, which for greedy decoding is the answer it would get alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
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
# serve.max_new_tokens_default auto, for a model folder whose serving.json has no evaluated value.
AUTO_FALLBACK_MAX_NEW_TOKENS = 64
REQUIRED_CONFIG = ("max_new_tokens_default", "max_new_tokens_limit", "temperature_max", "max_batch_requests",
                   "max_instruction_tokens", "max_system_tokens", "default_system", "pii_filter", "cache",
                   "batching", "threads", "log_path", "queue", "request_timeout_s", "stall_s")


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
    deadline: float = float("inf")      # time.monotonic() after which nobody waits for the answer
    request_id: str = ""                # the continuous engine's id for it


class Overloaded(Exception):
    """The decoding queue is full: try again after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Overloaded):
    """The request was not answered within its deadline (queued too long, or a slow batch)."""


class DecoderDown(Exception):
    """The decoding thread is not running: a server fault."""


class Batcher:
    """One decoding thread that batches the jobs queued while it was busy."""

    # The packaged model's repetition guard (serving.json, from params decoding): generate_batch keywords.
    guard: dict = {}

    def __init__(self, model, max_batch: int, window_ms: float, fmt, max_pending: int = 64,
                 timeout_s: float = 60.0, stall_s: float = 300.0, retry_after_s: float = 1.0):
        self.model = model
        self.fmt = fmt  # the chat format: pad and stop ids
        self.max_batch = max(1, int(max_batch))
        self.window_s = max(0.0, float(window_ms)) / 1000.0
        self.max_pending = max(1, int(max_pending))
        self.timeout_s = float(timeout_s)
        self.stall_s = float(stall_s)
        self.retry_after_s = float(retry_after_s)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self.pending = 0                    # jobs admitted and not yet finished (queued or decoding)
        self.busy_since: float | None = None
        self.batches = self.rows = self.rejected = self.expired = 0
        self._thread = threading.Thread(target=self._loop, name="serve-batcher", daemon=True)
        self._thread.start()

    def health(self) -> tuple[bool, str]:
        """(healthy, why): the decoding thread is alive and not stuck on one batch."""
        if not self._thread.is_alive():
            return False, "the decoding thread is not running"
        busy_since = self.busy_since
        if busy_since is not None and time.monotonic() - busy_since > self.stall_s:
            return False, f"the decoding thread has been on one batch for over {self.stall_s:g} s"
        return True, f"decoding thread alive, {self.pending} request(s) pending"

    def submit(self, jobs: list[Job], timeout_s: float | None = None) -> None:
        """Decode `jobs`; raises Overloaded when the queue is full, DeadlineExceeded when they are
        not done within the deadline, DecoderDown when the decoding thread is dead."""
        if not self._thread.is_alive():
            raise DecoderDown("the decoding thread is not running")
        with self._lock:
            if self.pending + len(jobs) > self.max_pending:
                self.rejected += 1
                raise Overloaded(f"server busy: {self.pending} requests queued (limit {self.max_pending})",
                                 self.retry_after_s)
            self.pending += len(jobs)
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        for job in jobs:
            job.deadline = deadline
        for job in jobs:
            self._enqueue(job)
        for job in jobs:
            if not job.done.wait(max(0.0, deadline - time.monotonic())):
                for abandoned in jobs:  # the decoding thread drops them if they are still queued
                    abandoned.deadline = 0.0
                raise DeadlineExceeded(f"not answered within {self.timeout_s:g} s (serve.request_timeout_s)",
                                       self.retry_after_s)
        for job in jobs:
            if isinstance(job.error, (DeadlineExceeded, DecoderDown)):
                raise job.error
            if job.error is not None:
                raise RuntimeError(f"generation failed: {job.error!r}") from job.error

    def _enqueue(self, job: Job) -> None:
        self._queue.put(job)

    def _finish(self, jobs: list[Job]) -> None:
        with self._lock:
            self.pending -= len(jobs)
        for job in jobs:
            job.done.set()

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
            now = time.monotonic()
            expired = [job for job in batch if job.deadline <= now]
            for job in expired:
                job.error = DeadlineExceeded("expired in the queue", self.retry_after_s)
            self.expired += len(expired)
            self._finish(expired)
            groups: dict[float, list[Job]] = {}
            for job in batch:
                if job.deadline > now:
                    groups.setdefault(job.temperature, []).append(job)
            for temperature, jobs in groups.items():
                self.busy_since = time.monotonic()
                try:
                    self._decode(jobs, temperature)
                except BaseException as exc:  # the thread must survive anything a batch does
                    for job in jobs:
                        job.error = exc
                finally:
                    self.busy_since = None
                    self._finish(jobs)

    def _decode(self, jobs: list[Job], temperature: float) -> None:
        longest = max(job.max_new_tokens for job in jobs)
        generations = generate_batch(self.model, [job.prompt for job in jobs], longest, self.fmt, temperature,
                                     **self.guard)
        self.batches += 1
        self.rows += len(jobs)
        for job, generation in zip(jobs, generations):
            tokens = generation.token_ids
            if len(tokens) > job.max_new_tokens:
                job.tokens, job.finished = tokens[:job.max_new_tokens], False
            else:
                job.tokens, job.finished = tokens, generation.finished
            job.batch_size = len(jobs)


def _cb_config_class():
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    return ContinuousBatchingConfig


# serve.batching.kv_padding_tokens 0: the padding granularity of the cached tokens a graphed step reads.
DEFAULT_KV_PADDING_TOKENS = 1024


def continuous_batching_config(device_type: str, max_batch: int, max_request_tokens: int,
                               max_batch_tokens: int = 0, cuda_graphs: str = "auto", kv_padding_tokens: int = 0,
                               compile_level: int = 0):
    """transformers' ContinuousBatchingConfig sized for the endpoint: room in the paged KV cache for
    `max_batch` requests of `max_request_tokens` (prompt + answer) each, no prefix sharing (an answer
    must not depend on which prompts came before it), CUDA graphs on a GPU unless cuda_graphs is "off".

    A CUDA graph replays fixed shapes, so with graphs transformers pads every step's inputs: the new
    tokens up to a multiple of 64 and the cached tokens it reads up to a multiple of
    `kv_padding_interval_size`, capturing one graph per padded size. Its default granularity, 16,384
    tokens, suits long contexts; an endpoint's Q&A requests hold a few hundred tokens each, and with
    SDPA (no flash attention in the serving image) every layer gathers the padded cache, repeats it
    for each query head and attends over it under a mask. So the endpoint pads to
    `kv_padding_tokens` (0 = 1024): a lone request reads ~1K positions a step instead of ~16K, for a
    few more graphs as a batch's cache grows. Padding does not change the answers (tests/test_serve.py).

    compile_level > 0 has transformers torch.compile the decoding step (its `default_compile_level`:
    1 inductor with dynamic shapes, 2-3 max-autotune), inside the CUDA graph on a GPU.

    Works with the field names of transformers 5.17 (block_size) and 5.24 (page_size)."""
    import dataclasses
    import math

    cls = _cb_config_class()
    fields = {f.name for f in dataclasses.fields(cls)}
    cuda = device_type == "cuda"
    page = 256 if cuda else 64
    pages_per_request = math.ceil(max_request_tokens / page) + 1
    kwargs = {
        "num_blocks": max_batch * pages_per_request + 2,
        "max_batch_tokens": max_batch_tokens or (2048 if cuda else 256),
        "max_requests_per_batch": max_batch,
        "allow_block_sharing": False,
        # auto = on with CUDA: transformers' own default turns graphs off for SDPA (it needs an
        # attention mask), but on an H200 they took a decoding step of the 1B model from ~39 ms to
        # 10.7 ms at batch 1 (docs/serving.md); never on a CPU.
        "use_cuda_graph": cuda_graphs != "off" if cuda else False,
        "use_async_batching": None if cuda else False,
        "scheduler_type": "fifo",
        "kv_padding_interval_size": kv_padding_tokens or DEFAULT_KV_PADDING_TOKENS,
    }
    if compile_level:
        if "default_compile_level" not in fields:
            raise ValueError(f"serve.batching.compile_level {compile_level}: this transformers' continuous batching "
                             "has no default_compile_level; set it to 0")
        kwargs["default_compile_level"] = compile_level
    kwargs["page_size" if "page_size" in fields else "block_size"] = page
    if "auto_switch_to_flash" in fields:
        kwargs["auto_switch_to_flash"] = cuda
    return cls(**{k: v for k, v in kwargs.items() if k in fields})


# torch._dynamo's recompile limit while the engine compiles its decoding step. transformers'
# deprecation wrapper is one code object shared by the model's forward and its layers' (different
# classes and argument lists), so dynamo keeps one compiled entry per caller under one function:
# more than its default of 8 (measured on the embedded 4-layer Llama with transformers 5.24; past
# the limit those frames silently fall back to eager).
COMPILE_RECOMPILE_LIMIT = 64


def prepare_compile(level: int) -> None:
    """Checks what serve.batching.compile_level needs before the engine starts: a C compiler
    (inductor builds its CPU kernels with one, Triton its GPU launchers) and room for dynamo's
    entries. Raises ValueError naming the setting."""
    import shutil

    named = os.environ.get("CC"), os.environ.get("CXX")
    found = [path for path in (shutil.which(n) for n in (*[n for n in named if n], "gcc", "g++", "cc", "clang"))
             if path]
    if not found:
        raise ValueError(f"serve.batching.compile_level {level} needs a C compiler on this host (torch.compile: "
                         "inductor's CPU kernels, Triton's GPU launchers); none found (CC, CXX, gcc, g++, cc, "
                         "clang). Install one in the serving image or set serve.batching.compile_level: 0")
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), COMPILE_RECOMPILE_LIMIT))


class ContinuousBatcher(Batcher):
    """Greedy requests through transformers' continuous batching; sampled ones through the static
    batcher's thread (inherited). Same admission, deadline and health contract as Batcher."""

    def __init__(self, model, max_batch: int, window_ms: float, fmt, max_pending: int = 64,
                 timeout_s: float = 60.0, stall_s: float = 300.0, retry_after_s: float = 1.0,
                 max_request_tokens: int = 2048, max_batch_tokens: int = 0, cuda_graphs: str = "auto",
                 kv_padding_tokens: int = 0, compile_level: int = 0):
        from transformers import GenerationConfig

        if compile_level:
            prepare_compile(compile_level)

        super().__init__(model, max_batch, window_ms, fmt, max_pending=max_pending, timeout_s=timeout_s,
                         stall_s=stall_s, retry_after_s=retry_after_s)
        device = next(model.parameters()).device
        self.stop_ids = set(fmt.stop_ids)
        generation = GenerationConfig(do_sample=False, max_new_tokens=max(1, max_request_tokens // 2),
                                      eos_token_id=list(fmt.stop_ids), pad_token_id=fmt.pad_id)
        self.cb_config = continuous_batching_config(device.type, self.max_batch, max_request_tokens,
                                                    max_batch_tokens, cuda_graphs, kv_padding_tokens, compile_level)
        self.manager = model.init_continuous_batching(generation_config=generation,
                                                      continuous_batching_config=self.cb_config)
        if device.type == "cuda" and hasattr(self.manager, "warmup"):
            self.manager.warmup()  # captures the CUDA graphs before the first request
        # Started from a daemon thread, so that the manager's thread (created without a daemon flag,
        # which it then inherits) never keeps a finishing process alive.
        # Under inference mode, which transformers (5.24) carries into the decoding thread: cheaper
        # than no_grad on a CPU (no autograd version counters), as generate_batch runs.
        def start():
            with torch.inference_mode():
                self.manager.start()

        starter = threading.Thread(target=start, daemon=True)
        starter.start()
        starter.join()
        self._inflight: dict[str, Job] = {}
        self._inflight_lock = threading.Lock()
        self._counter = 0
        self._closed = False
        self.steps_seen = 0
        self.progress_at = time.monotonic()   # when the decoding step counter last moved
        self.work_since: float | None = None  # requests handed to the manager and no step since it went idle
        self.max_inflight = 0
        self._collector = threading.Thread(target=self._collect_results, name="serve-cb-results", daemon=True)
        self._collector.start()

    def _step_counter(self) -> int:
        return int(getattr(self.manager, "current_batch", 0) or 0)

    def _note_progress(self, now: float) -> None:
        """Records when the decoding loop's step counter last moved, and goes idle once nothing is in
        flight and the loop has taken every cancellation (it drains them between steps, so a loop
        stuck in a step leaves them there)."""
        steps = self._step_counter()
        if steps != self.steps_seen:
            self.steps_seen, self.progress_at = steps, now
        with self._inflight_lock:
            if not self._inflight and self.manager.cancel_queue.empty():
                self.work_since = None

    def decoder_alive(self) -> bool:
        return (self._thread.is_alive() and self._collector.is_alive() and self.manager.is_running()
                and getattr(self.manager.background_thread_status, "fatal_error", None) is None)

    def health(self) -> tuple[bool, str]:
        if not self.decoder_alive():
            return False, "the decoding thread is not running"
        healthy, why = super().health()  # the sampling thread: alive, not stuck on one batch
        if not healthy:
            return healthy, why
        self._note_progress(time.monotonic())
        work_since = self.work_since
        if work_since is not None and time.monotonic() - max(work_since, self.progress_at) > self.stall_s:
            return False, f"the decoding thread has been on one batch (decoding step) for over {self.stall_s:g} s"
        return True, f"decoding thread alive, {self.pending} request(s) pending"

    def submit(self, jobs: list[Job], timeout_s: float | None = None) -> None:
        if not self.decoder_alive():
            raise DecoderDown("the decoding thread is not running")
        super().submit(jobs, timeout_s)

    def _enqueue(self, job: Job) -> None:
        if job.temperature > 0:
            self._queue.put(job)  # sampled: the static batcher's thread
            return
        with self._inflight_lock:
            self._counter += 1
            request_id = f"serve-{self._counter}"
            if self.work_since is None:
                self.work_since = time.monotonic()
            self._inflight[request_id] = job
            inflight = len(self._inflight)
            self.max_inflight = max(self.max_inflight, inflight)
            for neighbour in self._inflight.values():  # batch_size: most requests decoded at once
                neighbour.batch_size = max(neighbour.batch_size, inflight)
        job.request_id = request_id
        try:
            added = self.manager.add_request(list(job.prompt), request_id=request_id,
                                             max_new_tokens=job.max_new_tokens, eos_token_id=list(self.fmt.stop_ids))
        except BaseException as exc:  # noqa: BLE001 - the job fails, the server stays up
            added, job.error = None, exc
        if added is None:
            with self._inflight_lock:
                self._inflight.pop(request_id, None)
            job.error = job.error or DecoderDown("the decoding thread refused the request")
            self._finish([job])

    def _collect_results(self) -> None:
        """Routes finished results to their jobs; cancels jobs past their deadline; tracks progress."""
        while not self._closed:
            # Block until a result or the earliest deadline of a request in flight (at most 0.25 s):
            # no polling while the decoding loop works.
            with self._inflight_lock:
                earliest = min((job.deadline for job in self._inflight.values()), default=float("inf"))
            wait = min(0.25, max(0.005, earliest - time.monotonic()))
            try:
                result = self.manager.get_result(timeout=wait)
            except BaseException:  # noqa: BLE001 - keep routing
                result = None
            now = time.monotonic()
            self._note_progress(now)
            if result is not None and result.is_finished():
                with self._inflight_lock:
                    job = self._inflight.pop(result.request_id, None)
                if job is not None:
                    if getattr(result, "error", None):
                        job.error = RuntimeError(str(result.error))
                    else:
                        tokens, finished = [], False
                        for token in result.generated_tokens:
                            if token in self.stop_ids:
                                finished = True
                                break
                            tokens.append(int(token))
                        if len(tokens) > job.max_new_tokens:
                            tokens, finished = tokens[:job.max_new_tokens], False
                        job.tokens, job.finished = tokens, finished
                        self.rows += 1
                    self._finish([job])
            elif result is None and not self.manager.is_running():
                # The decoding thread is gone (stopped, or a fatal error): nobody will answer the
                # requests it held, so they fail now rather than at their deadlines.
                with self._inflight_lock:
                    orphans = list(self._inflight.values())
                    self._inflight.clear()
                fatal = getattr(self.manager.background_thread_status, "fatal_error", None)
                for job in orphans:
                    job.error = DecoderDown(f"the decoding thread stopped ({fatal!r})" if fatal else
                                            "the decoding thread stopped")
                self._finish(orphans)
                time.sleep(0.05)
            expired = []
            with self._inflight_lock:
                for request_id, job in list(self._inflight.items()):
                    if job.deadline <= now:
                        expired.append((request_id, self._inflight.pop(request_id)))
            for request_id, job in expired:
                self.manager.cancel_request(request_id)
                job.error = DeadlineExceeded("not answered within its deadline", self.retry_after_s)
                self.expired += 1
                self._finish([job])
            self._note_progress(time.monotonic())

    def close(self) -> None:
        super().close()
        try:
            self.manager.stop(block=True, timeout=10)
        finally:
            self._closed = True
            with self._inflight_lock:
                left = list(self._inflight.values())
                self._inflight.clear()
            for job in left:
                job.error = DecoderDown("the decoding thread stopped")
            self._finish(left)


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
        if config["max_new_tokens_default"] == "auto":
            # What the model was evaluated with (package wrote it from metrics/eval.json), within the limit.
            evaluated = self.metadata.get("max_new_tokens") or AUTO_FALLBACK_MAX_NEW_TOKENS
            self.limits = dataclasses.replace(self.limits, max_new_tokens_default=min(
                int(evaluated), int(config["max_new_tokens_limit"])))
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)
        self.redact_output = config["pii_filter"] == "redact"
        cache = config["cache"]
        self.cache = LRUCache(int(cache["size"])) if cache["enabled"] else None
        batching, limits = config["batching"], config["queue"]
        common = dict(max_pending=limits["max_pending"], timeout_s=config["request_timeout_s"],
                      stall_s=config["stall_s"], retry_after_s=limits["retry_after_s"])
        self.engine_kind = batching.get("engine", "continuous")
        # The decoding the model was evaluated with (package wrote it from params decoding).
        guard = dict(self.metadata.get("repetition_guard") or {})
        self.notes: list[str] = []
        if guard and self.engine_kind == "continuous":
            # transformers' continuous batching applies neither repetition_penalty nor no_repeat_ngram_size
            # (they are not among its per-request logits processors): serve as evaluated, on the static engine.
            self.notes.append(f"serve.batching.engine continuous cannot apply the model's repetition guard {guard}; "
                              "using the static engine, which decodes as the evaluate stage did")
            self.engine_kind = "static"
        if self.engine_kind == "continuous":
            # Room for the longest request the limits allow (chat template overhead included).
            longest = (int(config["max_system_tokens"]) + int(config["max_instruction_tokens"]) + 64
                       + int(config["max_new_tokens_limit"]))
            if self.context_length:
                longest = min(longest, int(self.context_length))
            self.batcher = ContinuousBatcher(self.model, batching["max_batch"], batching["window_ms"], self.chat,
                                             max_request_tokens=longest,
                                             max_batch_tokens=int(batching.get("max_batch_tokens", 0) or 0),
                                             cuda_graphs=batching.get("cuda_graphs", "auto"),
                                             kv_padding_tokens=int(batching.get("kv_padding_tokens", 0) or 0),
                                             compile_level=int(batching.get("compile_level", 0) or 0),
                                             **common)
        elif self.engine_kind == "static":
            self.batcher = Batcher(self.model, batching["max_batch"], batching["window_ms"], self.chat, **common)
            self.batcher.guard = guard
        else:
            raise ValueError(f"serve config: batching.engine must be 'continuous' or 'static', got {self.engine_kind!r}")
        # Warm-up: the first forward pass allocates and picks kernels; keep that off the first request.
        self.batcher.submit([Job(self.chat.prompt_ids(self.default_system, "Hello"), 2, 0.0)],
                            timeout_s=max(600.0, self.batcher.timeout_s))

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
