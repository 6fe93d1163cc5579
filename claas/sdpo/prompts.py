"""Prompt rendering: the student's chat prompt and the teacher's hindsight prompt.

The teacher is shown the student's conversation with the user's feedback appended to the last
user turn; the response tokens are scored unchanged after it. This module is the one place that
renders either prompt. Two hindsight styles:

- ``instruction`` (the default): ``(Instruction for your answer: <feedback>)``. A small model
  follows it as an instruction: SmolLM2-135M then answers greeting prompts as "Kuro" 12 times in
  12, against 3 in 12 with the context block (benchmarks/defaults.md).
- ``context``: a ``=== HINDSIGHT CONTEXT ===`` block that presents the feedback as a future
  message from the user, as in the SDPO paper's re-prompting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator

if TYPE_CHECKING:  # annotations only: the store imports this module, and needs no transformers
    from transformers import PreTrainedTokenizerBase

Message = Mapping[str, Any]


def utf8_text(value: str) -> str:
    """Refuse text that is not valid Unicode (lone surrogates, e.g. JSON "\\ud800"): the
    tokenizer cannot encode it. Use as a pydantic validator on every text field."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"text contains an invalid Unicode code point at position {error.start} (a lone "
            "surrogate); send valid UTF-8 text"
        ) from None
    return value


Utf8Text = Annotated[str, AfterValidator(utf8_text)]
# The longest text field of a request, in characters. JSON may spend 12 bytes on one character
# (an escaped surrogate pair), so one character over this still fits the default 1 MB body and
# gets its 422 naming the field, not a 413; and no model served here has a context that long.
MAX_TEXT_CHARS = 64_000


def chat_prompt_tokens(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template."""
    encoded = tokenizer.apply_chat_template(
        [{**m, "content": message_text(m["content"])} for m in messages],
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=True,
    )
    return [int(t) for t in encoded["input_ids"]]


HINDSIGHT_HEADER = "=== HINDSIGHT CONTEXT ==="
HINDSIGHT_INTRO = (
    "The following is a future message from the user. Use it to guide your answer to the "
    "message above."
)


def message_text(content: Any) -> str:
    """A message's text: a plain string, or OpenAI-style content parts of type text."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    raise ValueError(f"message content must be a string or a list of text parts, not {content!r}")


HindsightStyle = Literal["instruction", "context"]
INSTRUCTION_PREFIX = "(Instruction for your answer: "


EXAMPLE_INTRO = "An example of the answer wanted:"
EXAMPLE_OUTRO = "Now write your own answer."


def hindsight_block(
    feedback: str,
    repetitions: int = 1,
    style: HindsightStyle = "instruction",
    example: str | None = None,
) -> str:
    """What is appended to the last user turn, after a blank line: the feedback as an
    instruction in parentheses, or the header, the intro and the feedback (`context`). An
    `example` of the answer wanted follows it, as SDFT shows its teacher a demonstration: the
    teacher can copy what the student never says (a name), and the student still learns on its
    own samples."""
    if style == "instruction":
        hint = " ".join([feedback.strip()] * repetitions)
        block = f"\n\n{INSTRUCTION_PREFIX}{hint})"
    else:
        hint = "\n\n".join([feedback.strip()] * repetitions)
        block = f"\n\n{HINDSIGHT_HEADER}\n{HINDSIGHT_INTRO}\n{hint}"
    if example is not None:
        block += f"\n\n{EXAMPLE_INTRO}\n{example.strip()}\n\n{EXAMPLE_OUTRO}"
    return block


def teacher_messages(
    messages: Sequence[Message],
    feedback: str,
    repetitions: int = 1,
    style: HindsightStyle = "instruction",
    example: str | None = None,
) -> list[dict[str, Any]]:
    """The student's conversation with `feedback` appended to the last user turn as hindsight.

    The system prompt and earlier turns are unchanged. `repetitions` > 1 repeats the feedback
    to strengthen the hindsight signal.
    """
    rendered = [{**m, "content": message_text(m["content"])} for m in messages]
    last_user = max((i for i, m in enumerate(rendered) if m["role"] == "user"), default=None)
    if last_user is None:
        raise ValueError("the conversation has no user turn to attach the feedback to")
    rendered[last_user]["content"] += hindsight_block(feedback, repetitions, style, example)
    return rendered


def teacher_prompt_tokens(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    feedback: str,
    repetitions: int = 1,
    style: HindsightStyle = "instruction",
    example: str | None = None,
) -> list[int]:
    """The teacher's prompt: hindsight messages, chat template, generation prompt.

    The response tokens are appended unchanged by the caller, never re-encoded or truncated.
    """
    hindsight = teacher_messages(messages, feedback, repetitions, style, example)
    return chat_prompt_tokens(tokenizer, hindsight)


def teacher_text_prompt_tokens(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    feedback: str,
    repetitions: int = 1,
    style: HindsightStyle = "instruction",
    example: str | None = None,
) -> list[int]:
    """The teacher's prompt for a raw-text rollout (/v1/completions): no chat template, the
    student's prompt text with the same hindsight block appended."""
    block = hindsight_block(feedback, repetitions, style, example)
    return [int(t) for t in tokenizer.encode(prompt + block)]


def rollout_teacher_prompt_tokens(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    prompt_format: Literal["chat", "text"],
    feedback: str,
    repetitions: int = 1,
    style: HindsightStyle = "instruction",
    example: str | None = None,
) -> list[int]:
    """The teacher's prompt for a stored rollout of either kind: a chat rollout's messages, or
    a raw-text rollout whose prompt is the last message's text. The engine trains with it and
    the dashboard shows it, so both render the same tokens."""
    if prompt_format == "text":
        prompt = message_text(messages[-1]["content"])
        return teacher_text_prompt_tokens(tokenizer, prompt, feedback, repetitions, style, example)
    return teacher_prompt_tokens(tokenizer, messages, feedback, repetitions, style, example)
