"""The one Llama 3 chat format, shared by preprocessing, training, evaluation and serving.

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\n\n{instruction}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\n\n{output}<|eot_id|>

The prompt (everything up to and including the assistant header) is tokenised on its own and the
completion is appended, so the prompt tokens a model is trained on are exactly the tokens the
endpoint builds at inference time. `<|eot_id|>` ends the completion and is part of the loss;
padding uses `<|finetune_right_pad_id|>`, never an end token. Record text is tokenised with
special tokens split, so a question that contains the literal text "<|eot_id|>" cannot forge
a turn boundary.

This module only needs a tokenizer object with `convert_tokens_to_ids` and `__call__`; it imports
nothing heavy so that the endpoint's code folder can ship it.
"""

from __future__ import annotations

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
