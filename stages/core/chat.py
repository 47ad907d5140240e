"""The chat formats, shared by preprocessing, training, evaluation and serving.

`chat_format(tokenizer)` returns the one `ChatFormat` for a tokenizer: `Llama3Format` (first-class,
byte-exact, below) when the tokenizer has the Llama 3 special tokens, otherwise `TemplateFormat`, which
drives the tokenizer's own `chat_template` (SmolLM2's ChatML, for one) with the same guarantees. Stages
call the interface and never ask which format they hold.

The Llama 3 format:

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\n\n{instruction}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\n\n{output}<|eot_id|>

The prompt (everything up to and including the assistant header) is tokenised on its own and the
completion is appended, so the prompt tokens a model is trained on are exactly the tokens the
endpoint builds at inference time. `<|eot_id|>` ends the completion and is part of the loss;
padding uses `<|finetune_right_pad_id|>`, never an end token. Record text is tokenised with
special tokens split, so a question that contains the literal text "<|eot_id|>" cannot forge
a turn boundary.

This module only needs a tokenizer object with `convert_tokens_to_ids` and `__call__` (and
`apply_chat_template` for template formats); it imports nothing heavy so that the endpoint's code
folder can ship it.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
PAD = "<|finetune_right_pad_id|>"

BEGIN_OF_TEXT_ID = 128000
END_OF_TEXT_ID = 128001
START_HEADER_ID = 128006
END_HEADER_ID = 128007
EOT_ID = 128009
PAD_ID = 128004
# Generation stops on either end token: instruct models end turns with <|eot_id|>, base models
# end documents with <|end_of_text|>.
STOP_IDS = (EOT_ID, END_OF_TEXT_ID)
IGNORE_INDEX = -100

# The same format as a Jinja chat template, saved with every tokenizer this project writes so that
# `tokenizer.apply_chat_template` (and any serving stack that uses it) builds identical prompts.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens when training on completions only
    # How many leading tokens depend on the system prompt alone (the system turn and whatever the
    # template writes before the user's text): records with the same prefix can share its computation
    # (training.pack_segments). 0 = unknown, never shared.
    prefix_len: int = 0

    @property
    def num_completion_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _header(tokenizer, role: str) -> list[int]:
    return [START_HEADER_ID, *_text_ids(tokenizer, role), END_HEADER_ID, *_text_ids(tokenizer, "\n\n")]


def _text_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def check_tokenizer(tokenizer) -> None:
    """Fail early when a tokenizer does not use the Llama 3 special token ids assumed here."""
    expected = {BEGIN_OF_TEXT: BEGIN_OF_TEXT_ID, END_OF_TEXT: END_OF_TEXT_ID, START_HEADER: START_HEADER_ID,
                END_HEADER: END_HEADER_ID, EOT: EOT_ID, PAD: PAD_ID}
    wrong = {tok: tokenizer.convert_tokens_to_ids(tok) for tok, want in expected.items()
             if tokenizer.convert_tokens_to_ids(tok) != want}
    if wrong:
        raise ValueError(f"tokenizer is not a Llama 3 tokenizer: special token ids {wrong} differ from {expected}")


def prompt_ids(tokenizer, system: str, instruction: str) -> list[int]:
    """Token ids of the prompt up to and including the assistant header (the generation prompt)."""
    ids = [BEGIN_OF_TEXT_ID]
    if system:
        ids += _header(tokenizer, "system") + _text_ids(tokenizer, system) + [EOT_ID]
    ids += _header(tokenizer, "user") + _text_ids(tokenizer, instruction) + [EOT_ID]
    ids += _header(tokenizer, "assistant")
    return ids


def completion_ids(tokenizer, output: str) -> list[int]:
    return _text_ids(tokenizer, output) + [EOT_ID]


def encode_example(tokenizer, system: str, instruction: str, output: str,
                   completion_only: bool = True) -> EncodedExample:
    """Input ids and labels of one training record; labels mask the prompt when completion_only."""
    prompt = prompt_ids(tokenizer, system, instruction)
    completion = completion_ids(tokenizer, output)
    prompt_labels = [IGNORE_INDEX] * len(prompt) if completion_only else list(prompt)
    return EncodedExample(input_ids=prompt + completion, labels=prompt_labels + completion)


def messages(system: str, instruction: str, output: str | None = None) -> list[dict]:
    """The record as chat messages (for `apply_chat_template` and for humans)."""
    turns = [{"role": "system", "content": system}] if system else []
    turns.append({"role": "user", "content": instruction})
    if output is not None:
        turns.append({"role": "assistant", "content": output})
    return turns


# --------------------------------------------------------------------------------------------------
# One interface, one implementation per format
# --------------------------------------------------------------------------------------------------

class ChatFormatError(ValueError):
    """A tokenizer whose chat format cannot give the guarantees above; the message says why."""


class ChatFormat(ABC):
    """Prompt ids, completion ids with the end-of-turn token, stop ids and the pad id of one tokenizer."""

    name: str
    chat_template: str      # saved with the tokenizer, so apply_chat_template builds the same prompts
    eot_id: int             # ends the assistant turn; in the loss; generation stops on it
    stop_ids: tuple[int, ...]
    pad_id: int             # never an end token; masked out of attention and loss

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @abstractmethod
    def prompt_ids(self, system: str, instruction: str) -> list[int]:
        """The prompt up to and including the assistant header (the generation prompt)."""

    @abstractmethod
    def completion_ids(self, output: str) -> list[int]:
        """The answer's tokens followed by the end-of-turn token."""

    @property
    def pad_token(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(self.pad_id)

    @abstractmethod
    def prefix_ids(self, system: str) -> list[int]:
        """The prompt's tokens before the user's text: they depend on the system prompt alone."""

    def encode(self, system: str, instruction: str, output: str, completion_only: bool = True) -> EncodedExample:
        prompt = self.prompt_ids(system, instruction)
        completion = self.completion_ids(output)
        prompt_labels = [IGNORE_INDEX] * len(prompt) if completion_only else list(prompt)
        prefix = self.prefix_ids(system)
        prefix_len = len(prefix) if prompt[:len(prefix)] == prefix else 0
        return EncodedExample(input_ids=prompt + completion, labels=prompt_labels + completion, prefix_len=prefix_len)

    def prepare_tokenizer(self) -> None:
        """Set the pad token and the chat template on the tokenizer (what is saved with a model)."""
        self.tokenizer.pad_token = self.pad_token
        self.tokenizer.chat_template = self.chat_template

    def check_fits(self, vocab_size: int, model_setting: str = "model.base",
                   tokenizer_setting: str = "model.tokenizer") -> None:
        """Fail before any work when the tokenizer's ids exceed the model's embedding table."""
        # The ids that can reach the model: the base vocabulary, added tokens that are not special
        # (special ones never come from record text, which is tokenised with special tokens split),
        # and the format's own special tokens. A tokenizer may carry unused extras (the Llama 3.2
        # tokenizer has <|image|> = 128256 beyond the text models' 128,256 rows): they do not count.
        tok = self.tokenizer
        added = getattr(tok, "added_tokens_decoder", {}) or {}
        plain_added = [i for i, t in added.items() if not getattr(t, "special", False)]
        template = self.encode("s", "u", "a").input_ids
        largest = 1 + max(int(tok.vocab_size) - 1, self.pad_id, *self.stop_ids, *template, *plain_added)
        if largest > vocab_size:
            raise ChatFormatError(
                f"{tokenizer_setting} does not fit {model_setting}: the tokenizer has ids up to {largest - 1}, "
                f"the model's vocabulary has {vocab_size} entries; use the tokenizer the model was trained with "
                f"(set {tokenizer_setting} to the same value as {model_setting})")

    def describe(self) -> dict:
        convert = self.tokenizer.convert_ids_to_tokens
        return {"format": self.name, "eot": convert(self.eot_id), "stop": [convert(i) for i in self.stop_ids],
                "pad": self.pad_token}


class Llama3Format(ChatFormat):
    """The first-class Llama 3 format: the module-level functions above, byte for byte."""

    name = "llama3"
    chat_template = CHAT_TEMPLATE
    eot_id = EOT_ID
    stop_ids = STOP_IDS
    pad_id = PAD_ID

    def __init__(self, tokenizer):
        check_tokenizer(tokenizer)
        super().__init__(tokenizer)

    def prompt_ids(self, system: str, instruction: str) -> list[int]:
        return prompt_ids(self.tokenizer, system, instruction)

    def prefix_ids(self, system: str) -> list[int]:
        ids = [BEGIN_OF_TEXT_ID]
        if system:
            ids += _header(self.tokenizer, "system") + _text_ids(self.tokenizer, system) + [EOT_ID]
        return ids + _header(self.tokenizer, "user")

    def completion_ids(self, output: str) -> list[int]:
        return completion_ids(self.tokenizer, output)


# Placeholders rendered through the template in place of record text; their positions split the
# rendered text into template pieces (special tokens parsed) and record slots (special tokens split).
_SLOTS = {"system": "\x00SYSTEM\x00", "user": "\x00USER\x00", "assistant": "\x00ASSISTANT\x00"}
_END_OF_TEXT_NAMES = re.compile(r"end_?of_?text|endoftext|^</s>$", re.IGNORECASE)


class TemplateFormat(ChatFormat):
    """Any tokenizer's own Jinja chat template, e.g. ChatML (<|im_start|>role\n...<|im_end|>\n).

    The template is rendered once with placeholders instead of record text. Template text is then
    tokenised with its special tokens, record text with special tokens split, so "<|im_end|>" inside
    a question stays text. The end-of-turn token is the first special token the template writes after
    the assistant's content; the pad is the tokenizer's pad token when it is no end token, otherwise
    the first special token that the template never writes and that ends nothing.
    """

    name = "template"

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        template = getattr(tokenizer, "chat_template", None)
        if not template or not isinstance(template, str):
            raise ChatFormatError("the tokenizer has no chat template (tokenizer.chat_template is empty); use a "
                                  "chat/instruct model's tokenizer, or a Llama 3 tokenizer")
        self.chat_template = template
        self._with_system = self._pieces(system=True)
        self._without_system = self._pieces(system=False)
        special = self._special_ids()
        self.eot_id = self._end_of_turn(special)
        stops = [self.eot_id]
        for token_id in (getattr(tokenizer, "eos_token_id", None), *special.values()):
            if token_id is not None and token_id not in stops and (
                    token_id == getattr(tokenizer, "eos_token_id", None)
                    or _END_OF_TEXT_NAMES.search(tokenizer.convert_ids_to_tokens(token_id) or "")):
                stops.append(token_id)
        self.stop_ids = tuple(stops)
        self.pad_id = self._choose_pad(special)

    # -- rendering -------------------------------------------------------------------------------

    def _render(self, turns: list[tuple[str, str]], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja2 raises its own types; any of them means "cannot render"
            raise ChatFormatError(f"the tokenizer's chat template cannot render a system/user/assistant "
                                  f"conversation: {exc}") from None

    def _pieces(self, system: bool) -> dict:
        """Template text around the record slots, for a prompt and for a whole conversation."""
        turns = ([("system", _SLOTS["system"])] if system else []) + [("user", _SLOTS["user"])]
        prompt = self._render(turns, generation_prompt=True)
        full = self._render(turns + [("assistant", _SLOTS["assistant"])], generation_prompt=False)
        slots = [_SLOTS["system"]] if system else []
        prompt_parts = self._split(prompt, slots + [_SLOTS["user"]])
        if not full.startswith(prompt):
            raise ChatFormatError("the chat template's generation prompt is not a prefix of the rendered "
                                  "conversation, so the prompt served would differ from the prompt trained on")
        after = full[len(prompt):]
        if not after.startswith(_SLOTS["assistant"]):
            raise ChatFormatError("the chat template writes text between the generation prompt and the "
                                  "assistant's answer; its prompts cannot match training")
        return {"prompt": prompt_parts, "after_answer": after[len(_SLOTS["assistant"]):]}

    @staticmethod
    def _split(text: str, slots: list[str]) -> list[str]:
        parts = []
        for slot in slots:
            if text.count(slot) != 1:
                raise ChatFormatError("the chat template drops or repeats message content, so record text "
                                      "cannot be placed exactly once")
            head, text = text.split(slot)
            parts.append(head)
        parts.append(text)
        return parts

    def _template_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    # -- special tokens ----------------------------------------------------------------------------

    def _special_ids(self) -> dict[str, int]:
        tok = self.tokenizer
        names = set(getattr(tok, "all_special_tokens", []) or [])
        added = getattr(tok, "added_tokens_decoder", {}) or {}
        names |= {t.content for t in added.values() if getattr(t, "special", False)}
        ids = {name: tok.convert_tokens_to_ids(name) for name in names}
        return {name: i for name, i in sorted(ids.items(), key=lambda kv: kv[1]) if isinstance(i, int) and i >= 0}

    def _end_of_turn(self, special: dict[str, int]) -> int:
        after = self._template_ids(self._with_system["after_answer"])
        for token_id in after:
            if token_id in special.values():
                return token_id
        raise ChatFormatError("the chat template does not end the assistant's turn with a special token, so "
                              "generation could not stop on it and the loss could not teach it")

    def _choose_pad(self, special: dict[str, int]) -> int:
        tok = self.tokenizer
        used = set()
        for pieces in (self._with_system, self._without_system):
            for text in pieces["prompt"] + [pieces["after_answer"]]:
                used.update(self._template_ids(text))
        bos = getattr(tok, "bos_token_id", None)
        own = getattr(tok, "pad_token_id", None)
        if own is not None and own not in self.stop_ids and own != bos and own not in used:
            return own
        for token_id in special.values():
            if token_id not in self.stop_ids and token_id != bos and token_id not in used:
                return token_id
        raise ChatFormatError("the tokenizer has no special token to pad with that is not an end token; "
                              "add a pad token to the tokenizer")

    # -- the interface ------------------------------------------------------------------------------

    def prompt_ids(self, system: str, instruction: str) -> list[int]:
        pieces = self._with_system if system else self._without_system
        texts = [system, instruction] if system else [instruction]
        ids: list[int] = []
        for template_text, record_text in zip(pieces["prompt"], texts):
            ids += self._template_ids(template_text) + _text_ids(self.tokenizer, record_text)
        return ids + self._template_ids(pieces["prompt"][-1])

    def completion_ids(self, output: str) -> list[int]:
        return _text_ids(self.tokenizer, output) + [self.eot_id]

    def prefix_ids(self, system: str) -> list[int]:
        pieces = self._with_system if system else self._without_system
        if not system:
            return self._template_ids(pieces["prompt"][0])
        return (self._template_ids(pieces["prompt"][0]) + _text_ids(self.tokenizer, system)
                + self._template_ids(pieces["prompt"][1]))


def chat_format(tokenizer) -> ChatFormat:
    """The tokenizer's chat format (cached on the tokenizer: building a template format renders it)."""
    cached = getattr(tokenizer, "_project_chat_format", None)
    if cached is not None:
        return cached
    llama3 = all(tokenizer.convert_tokens_to_ids(tok) == want for tok, want in
                 ((BEGIN_OF_TEXT, BEGIN_OF_TEXT_ID), (START_HEADER, START_HEADER_ID), (EOT, EOT_ID), (PAD, PAD_ID)))
    fmt = Llama3Format(tokenizer) if llama3 else TemplateFormat(tokenizer)
    try:
        tokenizer._project_chat_format = fmt
    except AttributeError:  # pragma: no cover - a tokenizer type that refuses new attributes
        pass
    return fmt
