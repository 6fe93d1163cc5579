"""Preferences: what `claas eval` teaches, each a YAML file.

A preference names the feedback message a user would send, the prompts its rollouts are sampled
on (`training_prompts`), held-out `probes` that compliance is measured on (never trained on: the
two lists must be disjoint), a verifier that scores one answer, and preferred / dispreferred
answer pairs whose log-probability margin shows the adapter moving before its samples do. It may
also carry an `example`, an answer the user wanted, sent with every feedback item (the teacher
is shown it; see the feedback API): for what the model never says by itself, such as a name.

Shipped preferences live next to this module (`preferences/<name>.yaml`): `concise`,
`no_emoji`, `identity`. A user's own is named by its path:

    load_preference("concise")
    load_preference("./my_prefs/formal.yaml")
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from claas.eval.verifiers import Verifier, build_verifier
from claas.sdpo.config import ExampleText, FeedbackText

MIN_PROMPTS = 12


class VerifierSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class ResponsePair(BaseModel):
    """A preferred and a dispreferred answer to one prompt, for the log-prob margin."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1)
    preferred: str = Field(min_length=1)
    dispreferred: str = Field(min_length=1)


class Preference(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
    feedback: FeedbackText
    example: ExampleText | None = Field(
        None, description="an answer the user wanted, sent with each feedback item"
    )
    verifier: VerifierSpec
    probes: list[str] = Field(min_length=MIN_PROMPTS)
    training_prompts: list[str] = Field(min_length=MIN_PROMPTS)
    pairs: list[ResponsePair] = Field(min_length=1)
    changes_length: bool = Field(
        False, description="teaching it changes answer length on purpose: no length-drift alert"
    )

    @model_validator(mode="after")
    def _held_out(self) -> Preference:
        shared = {p.strip().lower() for p in self.probes} & {
            p.strip().lower() for p in self.training_prompts
        }
        if shared:
            raise ValueError(
                f"probes must be held out from training_prompts, but both hold {sorted(shared)}; "
                "remove them from one list"
            )
        build_verifier(self.verifier.name, self.verifier.params)  # refuse a bad verifier now
        return self

    def build_verifier(self) -> Verifier:
        return build_verifier(self.verifier.name, self.verifier.params)


def shipped_preferences() -> list[str]:
    folder = resources.files("claas.eval") / "preferences"
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def load_preference(name_or_path: str) -> Preference:
    """A shipped preference by name, or a user's YAML by path; ValueError says what to fix."""
    if name_or_path in shipped_preferences():
        source = resources.files("claas.eval") / "preferences" / f"{name_or_path}.yaml"
        text, where = source.read_text(encoding="utf-8"), f"shipped preference {name_or_path!r}"
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ValueError(
                f"preference {name_or_path!r} is neither shipped "
                f"({', '.join(shipped_preferences())}) nor a YAML file; give a name or a path"
            )
        text, where = path.read_text(encoding="utf-8"), str(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"{where}: not valid YAML ({error})") from None
    try:
        return Preference.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in error.errors()
        )
        raise ValueError(f"{where}: {problems}") from None
