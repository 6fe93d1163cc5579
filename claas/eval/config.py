"""The eval run's configuration: a YAML file plus `key=value` overrides, checked by pydantic.

    claas eval --config my_eval.yaml num_steps=20 training.learning_rate=1e-4 continual=true

Overrides use dotted keys for nesting and YAML scalars for values (`true`, `1e-4`,
`[concise,identity]`, `examples.identity="I'm Kuro, your assistant."`). Unknown keys are
refused with the valid ones listed. `training` holds
`claas.sdpo.engine.TrainingConfig` fields and `adapter` holds `claas.adapters.AdapterSpec` fields;
fields left unset there are not sent, so the server's own defaults apply, and the resolved
`config.yaml` of a run keeps them unset too. `resolve` gives a new run its id and directory, or
resumes the run stored in `output_dir` from its `config.yaml`, refusing settings that would
change its results.
"""

from __future__ import annotations

import datetime as dt
import secrets
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
)

from claas.adapters import AdapterSpec
from claas.errors import InvalidRequest
from claas.ids import LORA_ID_PART
from claas.sdpo.config import ExampleText
from claas.sdpo.engine import TrainingConfig

MetricGroup = Literal["compliance", "margin", "capability", "collapse", "training"]
METRIC_GROUPS: tuple[MetricGroup, ...] = (
    "compliance",
    "margin",
    "capability",
    "collapse",
    "training",
)


class EvalConfigError(InvalidRequest):
    """A config file or override that cannot be used; the message names the key."""


class AlertThresholds(BaseModel):
    """When a metric is reported as an alert in the summary."""

    model_config = ConfigDict(extra="forbid")

    min_capability_ratio: float = Field(0.9, ge=0, description="capability / baseline below")
    min_entropy_ratio: float = Field(0.5, ge=0, description="entropy / baseline below")
    max_self_rouge_l: float = Field(0.8, ge=0, le=1, description="samples this alike")
    min_distinct_2: float = Field(0.3, ge=0, le=1, description="distinct bigrams below")
    max_length_drift: float = Field(
        0.75, ge=0, description="|mean length / baseline − 1| above (concise moves it on purpose)"
    )
    max_repetition: float = Field(
        0.25,
        ge=0,
        le=1,
        description="repetition_mean above: this share of the step's word 3-grams repeat "
        "(claas.eval.collapse)",
    )


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,29}$",
        description="set when the run starts (eval-YYYYmmdd-HHMMSS-<seed>); names the adapters",
    )
    preferences: list[str] = Field(
        default_factory=lambda: ["concise", "identity", "no_emoji"],
        min_length=1,
        description="shipped preference names or paths to preference YAML files; with "
        "continual, each entry is a stage and a preference may come back ([concise, identity, "
        "concise]: concise again, on its next training prompts)",
    )
    examples: dict[str, ExampleText] = Field(
        default_factory=dict,
        description="preference name → an answer the user wanted, sent with each of its "
        "feedback items (overrides the preference's own `example`)",
    )
    num_steps: int = Field(10, ge=0, le=10_000, description="feedback steps per stage")
    batch_size: int = Field(4, ge=1, le=64, description="answers per feedback request")
    seed: int = Field(0, ge=0, lt=2**31, description="every sampling seed derives from it")
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    adapter: AdapterSpec = Field(default_factory=AdapterSpec)
    metrics: list[MetricGroup] = Field(default_factory=lambda: list(METRIC_GROUPS))
    collapse_steps: int = Field(5, ge=1, description="collapse metrics every N steps (and last)")
    collapse_probes: int = Field(4, ge=1, description="probes sampled for collapse metrics")
    collapse_samples: int = Field(4, ge=2, le=16, description="samples (seeds) per probe")
    capability_steps: int = Field(1, ge=1, description="capability set every N steps (and last)")
    probe_limit: int | None = Field(
        None, ge=1, description="measure only the first N probes of each preference (quick runs)"
    )
    capability_limit: int | None = Field(
        None, ge=1, description="ask only the first N capability questions (quick runs)"
    )
    max_tokens: int = Field(128, ge=1, description="max_tokens of rollouts and probe answers")
    capability_max_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.7, ge=0, le=2, description="rollouts and probe answers")
    output_dir: Path | None = Field(None, description="default <data_dir>/evals/<run_id>")
    continual: bool = Field(False, description="teach the preferences in order, one adapter")
    owner: str = Field("eval", description="owner part of the adapter ids (your key's owner)")
    thresholds: AlertThresholds = Field(default_factory=AlertThresholds)
    concurrency: int = Field(
        8,
        ge=1,
        le=64,
        description="requests in flight at once; a step sends all its measurements together, "
        "so the server batches them",
    )
    feedback_timeout: float = Field(1800.0, gt=0, description="seconds to wait for training")

    @field_validator("owner")
    @classmethod
    def _owner(cls, value: str) -> str:
        if not LORA_ID_PART.fullmatch(value):
            raise ValueError("use letters, digits, '_' and '-' (at most 64), starting alnum")
        return value

    @field_validator("metrics")
    @classmethod
    def _unique(cls, value: list[MetricGroup]) -> list[MetricGroup]:
        return list(dict.fromkeys(value))

    @field_serializer("training")
    def _training_as_set(self, value: TrainingConfig) -> dict[str, Any]:
        return value.model_dump(mode="json", exclude_unset=True)

    @field_serializer("adapter")
    def _adapter_as_set(self, value: AdapterSpec) -> dict[str, Any]:
        return value.model_dump(mode="json", exclude_unset=True)

    def wants(self, group: MetricGroup) -> bool:
        return group in self.metrics


def new_run_id(seed: int, now: dt.datetime | None = None) -> str:
    """Time, seed and 4 random hex digits: two runs started in the same second with the same
    seed (a top-K and a scalar run side by side) still get their own adapters."""
    moment = now or dt.datetime.now(dt.UTC)
    return f"eval-{moment:%Y%m%d-%H%M%S}-{seed:x}-{secrets.token_hex(2)}"


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`a.b=1` items as a nested dict; values are YAML scalars (or flow lists)."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise EvalConfigError(
                f"override {pair!r} is not key=value; write e.g. num_steps=5 or "
                "training.learning_rate=1e-4"
            )
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as error:
            raise EvalConfigError(f"override {pair!r}: the value is not YAML ({error})") from None
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise EvalConfigError(f"override {pair!r} conflicts with an earlier one")
            node = child
        node[parts[-1]] = value
    return tree


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise EvalConfigError(f"cannot read config file {path} ({error}); check the path") from None
    except yaml.YAMLError as error:
        raise EvalConfigError(f"config file {path} is not valid YAML ({error})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise EvalConfigError(f"config file {path} must hold a mapping of settings at the top")
    return raw


def validate_config(raw: dict[str, Any]) -> EvalConfig:
    try:
        return EvalConfig.model_validate(raw)
    except ValidationError as error:
        raise EvalConfigError(describe(error)) from None


def describe(error: ValidationError) -> str:
    problems = []
    for issue in error.errors():
        location = ".".join(str(p) for p in issue["loc"])
        if issue["type"] == "extra_forbidden":
            parent = issue["loc"][:-1]
            valid = ", ".join(sorted(_fields_at(parent)))
            problems.append(f"unknown key {location!r}; valid keys here: {valid}")
        else:
            problems.append(f"{location}: {issue['msg']}")
    return "invalid eval config: " + "; ".join(problems) + ". Fix the config file or override"


def _fields_at(path: tuple[int | str, ...]) -> list[str]:
    model: type[BaseModel] = EvalConfig
    for part in path:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def load_config(config_file: Path | None, overrides: list[str]) -> EvalConfig:
    raw = read_config_file(config_file) if config_file is not None else {}
    return validate_config(merge(raw, parse_overrides(overrides)))


def dump_config(config: EvalConfig) -> str:
    data = config.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# Settings that change no result: a resumed run may use other values.
_RESUME_FREE = ("concurrency", "feedback_timeout", "output_dir")


def resolve(raw: dict[str, Any], data_dir: Path) -> tuple[EvalConfig, Path]:
    """The run's config and directory: a new run, or the stored one in `output_dir`.

    `raw` is what the user gave (file + overrides). When `output_dir` holds a run, its stored
    config is the base and `raw` must not change anything that affects results.
    """
    given = validate_config(raw)
    if given.output_dir is not None:
        given = given.model_copy(update={"output_dir": given.output_dir.expanduser()})
    if given.output_dir is not None and (given.output_dir / "config.yaml").is_file():
        stored_raw = yaml.safe_load((given.output_dir / "config.yaml").read_text("utf-8"))
        stored = validate_config(stored_raw)
        config = validate_config(merge(stored_raw, {**raw, "run_id": stored.run_id}))
        before, after = stored.model_dump(mode="json"), config.model_dump(mode="json")
        changed = sorted(k for k in after if k not in _RESUME_FREE and after[k] != before[k])
        if changed:
            raise EvalConfigError(
                f"{given.output_dir} holds run {stored.run_id} with other values for "
                f"{', '.join(changed)}; to resume it, drop those settings (its config.yaml is "
                "used), or pass a new output_dir for a new run"
            )
        return config.model_copy(update={"output_dir": given.output_dir}), given.output_dir
    run_id = given.run_id or new_run_id(given.seed)
    run_dir = (given.output_dir or data_dir / "evals" / run_id).expanduser()
    config = given.model_copy(update={"run_id": run_id, "output_dir": run_dir})
    return config, run_dir
