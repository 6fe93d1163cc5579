"""The capability set: short questions with checkable answers, to see what training costs.

Arithmetic, capitals, unit conversions and simple facts (`capability.yaml`), asked greedily.
An answer is correct when, after normalisation (lower case, curly quotes and dashes made plain,
thousands separators dropped), one of the expected answers appears in it as a whole word:
"The answer is 72." is right for 72, "720" is not. `claas eval` reports accuracy as a ratio to
the adapter's baseline, so a drop shows the preference was learnt at the cost of knowledge.
"""

from __future__ import annotations

import re
from importlib import resources

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_PLAIN = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"', "–": "-", "—": "-"})


class CapabilityQuestion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    question: str = Field(min_length=1)
    answers: list[str] = Field(min_length=1)


def normalise(text: str) -> str:
    text = _THOUSANDS.sub("", text.translate(_PLAIN).lower())
    return " ".join(text.split())


def is_correct(response: str, answers: list[str]) -> bool:
    text = normalise(response)
    for answer in answers:
        expected = re.escape(normalise(answer))
        # A whole word: not inside a longer word or number ("72" is not in "720" or "1.72").
        if re.search(rf"(?<![\w.]){expected}(?![\w]|\.\d)", text):
            return True
    return False


def load_capability_set() -> list[CapabilityQuestion]:
    text = (resources.files("claas.eval") / "capability.yaml").read_text(encoding="utf-8")
    questions = yaml.safe_load(text)["questions"]
    return TypeAdapter(list[CapabilityQuestion]).validate_python(questions)
