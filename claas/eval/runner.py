"""The feedback loop: teach each preference by feedback, measuring it as it learns.

Per preference (each on a fresh adapter, or with `continual: true` one after another on one
adapter): measure the baseline (step 0); then, per step, sample `batch_size` answers to the next
training prompts (cycled in order), send the preference's feedback (and its `example`, if any)
on them with `wait=true`, and measure again on the held-out probes. Each step appends one line
to `steps.jsonl`, then `summary.json` and the plots are rebuilt from those lines.

**Stages.** Each entry of `preferences` is a stage, and its lines carry its index (`stage`).
With `continual: true` a preference may come back (`[concise, no_emoji, concise]`): the later
stage goes on through that preference's training prompts where the earlier one stopped (new
prompts, cycling only once all are used), so it asks "does concise come back, on prompts it was
never taught on?"; its rollout seeds count on the same way, so a run without repeats samples
what it did before stages existed. A continual step measures every preference taught so far.
Ratios (entropy, length) compare against the preference's first baseline, capability against
the adapter's.

**Resuming.** Adapter ids derive from the run id (`<owner>/<run_id>-<preference>`, or
`-continual`), and the run id is kept in `<output_dir>/config.yaml`, so re-running with the same
output dir finds the same adapters. Every line records the adapter version it measured. A run
killed mid-step may have trained a version that no line records (or the server may still be
training it): the runner waits until that adapter has no feedback queued or running, then rolls
it back (`POST /v1/adapters/{owner}/{name}/rollback`) to the version of its last recorded line
and redoes the step with the same seeds. Versions are never reused, so the discarded one stays
listed but unserved. A half-written last line is dropped. An adapter created before its
baseline line was written is deleted and made again.

    config = load_config(Path("eval.yaml"), ["num_steps=5"])
    run_dir = run_eval(config, url="http://127.0.0.1:8000", api_key=None, data_dir=data_dir)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from claas.eval import report
from claas.eval.capability import load_capability_set
from claas.eval.client import Answer, ClaasClient
from claas.eval.collapse import repetition
from claas.eval.config import (
    EvalConfig,
    EvalConfigError,
    dump_config,
    merge,
    new_run_id,
    validate_config,
)
from claas.eval.measure import Measurer, Pending, derive_seed
from claas.eval.preferences import Preference, load_preference

# Settings that change no result: a resumed run may use other values.
_RESUME_FREE = ("concurrency", "feedback_timeout", "output_dir")


@dataclass(frozen=True)
class Task:
    """One line of steps.jsonl to produce: `preference` at `step` (0 = baseline) of `stage`."""

    preference: Preference
    stage: int  # its entry's index in `preferences`
    step: int
    global_step: int
    lora_id: str
    measured: tuple[Preference, ...]  # whose compliance this step measures
    taught_before: int  # steps of this preference in earlier stages: where its prompts go on

    @property
    def position(self) -> int:
        """This step's number among all steps of its preference (the first stage's: `step`)."""
        return self.taught_before + self.step


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def plan(config: EvalConfig, stages: Sequence[Preference]) -> list[Task]:
    """The run's lines in order, one stage (an entry of `preferences`) after another."""
    run_id = config.run_id or ""
    tasks = []
    taught: dict[str, int] = {}  # preference name → its steps in the stages so far
    for index, preference in enumerate(stages):
        if config.continual:
            lora_id = f"{config.owner}/{run_id}-continual"
            measured = tuple(distinct(stages[: index + 1]))
            offset = index * config.num_steps
        else:
            lora_id, measured, offset = (
                f"{config.owner}/{run_id}-{preference.name}",
                (preference,),
                0,
            )
        before = taught.get(preference.name, 0)
        for step in range(config.num_steps + 1):
            tasks.append(Task(preference, index, step, offset + step, lora_id, measured, before))
        taught[preference.name] = before + config.num_steps
    return tasks


def distinct(stages: Sequence[Preference]) -> list[Preference]:
    """Each preference once, in the order it is first taught."""
    first: dict[str, Preference] = {}
    for preference in stages:
        first.setdefault(preference.name, preference)
    return list(first.values())


def check_stages(config: EvalConfig, stages: Sequence[Preference]) -> None:
    """A preference may come back only in a continual run, and one name means one preference."""
    first: dict[str, Preference] = {}
    for entry, preference in zip(config.preferences, stages, strict=True):
        seen = first.setdefault(preference.name, preference)
        if seen != preference:
            raise EvalConfigError(
                f"preferences holds two different preferences named {preference.name!r} (the "
                f"second is {entry!r}); give one of them another `name`"
            )
    repeated = sorted({p.name for p in stages if sum(q.name == p.name for q in stages) > 1})
    if repeated and not config.continual:
        raise EvalConfigError(
            f"preferences name {', '.join(repeated)} more than once; without continual each "
            "preference trains its own adapter once. To teach it again after others on one "
            "adapter, set continual=true, or drop the repeat"
        )


def with_examples(stages: Sequence[Preference], examples: dict[str, str]) -> list[Preference]:
    """The stages with `examples` (name → example) replacing each named preference's own."""
    names = [p.name for p in distinct(stages)]
    unknown = sorted(set(examples) - set(names))
    if unknown:
        raise EvalConfigError(
            f"examples name {', '.join(map(repr, unknown))}, which this run does not teach "
            f"({', '.join(names)}); key examples by a preference's name"
        )
    return [
        p.model_copy(update={"example": examples[p.name]}) if p.name in examples else p
        for p in stages
    ]


# ---------------------------------------------------------------------------------------------
# The run directory
# ---------------------------------------------------------------------------------------------


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


def read_lines(path: Path) -> list[dict[str, Any]]:
    """steps.jsonl's complete lines, up to a half-written one (a kill mid-write); read only."""
    if not path.exists():
        return []
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        if not raw.strip():
            continue
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            break  # only the last line can be torn: steps.jsonl is append-only
    return lines


def repair_lines(path: Path) -> list[dict[str, Any]]:
    """`read_lines`, and rewrite the file without a torn last line so appends start clean."""
    lines = read_lines(path)
    if path.exists() and len(path.read_text(encoding="utf-8").splitlines()) != len(lines):
        report.write_atomic(path, "".join(json.dumps(line) + "\n" for line in lines))
    return lines


def append_line(path: Path, line: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(line, allow_nan=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class EvalRun:
    def __init__(self, config: EvalConfig, run_dir: Path, client: ClaasClient, url: str) -> None:
        self.config = config
        self.run_dir = run_dir
        self.client = client
        self.url = url
        stages = [load_or_explain(name) for name in config.preferences]
        check_stages(config, stages)
        self.stages = with_examples(stages, config.examples)
        self.preferences = distinct(self.stages)
        self.questions = load_capability_set()
        self.tasks = plan(config, self.stages)
        self.lines_path = run_dir / "steps.jsonl"
        self.lines: list[dict[str, Any]] = []
        self.started_at = _now()
        self.divergence_mode: str = config.training.divergence_mode
        self.measurer = Measurer(client, config)

    @property
    def lora_ids(self) -> list[str]:
        return list(dict.fromkeys(task.lora_id for task in self.tasks))

    def run(self) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        report.write_atomic(self.run_dir / "config.yaml", dump_config(self.config))
        self.lines = repair_lines(self.lines_path)
        self._check_prefix()
        previous = self.run_dir / "summary.json"
        if previous.exists():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.started_at = str(json.loads(previous.read_text("utf-8"))["started_at"])
        for line in self.lines:
            mode = (line.get("training") or {}).get("divergence_mode")
            self.divergence_mode = mode if isinstance(mode, str) else self.divergence_mode
        clock = time.monotonic()
        try:
            self._write_summary("running")
            todo = self.tasks[len(self.lines) :]
            ready: set[str] = set()
            with tqdm(
                total=len(self.tasks), initial=len(self.lines), desc="claas eval", unit="step"
            ) as bar:
                for task in todo:
                    if task.lora_id not in ready:
                        self._prepare_adapter(task.lora_id)
                        ready.add(task.lora_id)
                    line = self._do(task, clock)
                    append_line(self.lines_path, line)
                    self.lines.append(line)
                    self._write_summary("running")
                    bar.set_postfix(
                        preference=task.preference.name,
                        stage=task.stage,
                        step=task.step,
                        compliance=f"{line['metrics'].get('compliance', float('nan')):.2f}",
                    )
                    bar.update(1)
        except BaseException as error:
            reason = (
                "interrupted; re-run with the same output_dir to resume"
                if isinstance(error, KeyboardInterrupt)
                else f"{type(error).__name__}: {error}"
            )
            self._write_summary("failed", error=reason)
            raise
        finally:
            self.measurer.close()
        self._write_summary("done")
        return self.run_dir

    def _check_prefix(self) -> None:
        # Lines written before stages existed have no `stage`: their preference had one stage.
        stages_of: dict[str, list[int]] = {}
        for index, preference in enumerate(self.stages):
            stages_of.setdefault(preference.name, []).append(index)
        for index, line in enumerate(self.lines):
            if index >= len(self.tasks):
                raise EvalConfigError(
                    f"{self.lines_path} has more lines than this run's plan ({len(self.tasks)}); "
                    "it belongs to another run: use a new output_dir"
                )
            task = self.tasks[index]
            name = line.get("preference")
            only = stages_of.get(str(name), [])
            stage = line.get("stage", only[0] if len(only) == 1 else None)
            if (name, stage, line.get("step")) != (task.preference.name, task.stage, task.step):
                raise EvalConfigError(
                    f"{self.lines_path} line {index + 1} is {name} stage {stage} step "
                    f"{line.get('step')}, but this run's plan has {task.preference.name} stage "
                    f"{task.stage} step {task.step} there; use a new output_dir"
                )

    def _prepare_adapter(self, lora_id: str) -> None:
        """Make the adapter's current version the one its last recorded line measured."""
        recorded = [line for line in self.lines if line.get("lora_id") == lora_id]
        adapter = self.client.get_adapter(lora_id)
        if adapter is not None:
            self.client.wait_idle(lora_id, self.config.feedback_timeout)
            adapter = self.client.get_adapter(lora_id)
        if not recorded:
            if adapter is not None:  # made by a run killed before its baseline was written
                self.client.delete_adapter(lora_id)
            spec = self.config.adapter.model_dump(mode="json", exclude_unset=True)
            # From the seed and the role, not the run id: runs compared on one seed start alike.
            role = lora_id.removeprefix(f"{self.config.owner}/{self.config.run_id}-")
            spec.setdefault("seed", derive_seed(self.config.seed, "adapter", role))
            self.client.create_adapter(lora_id, spec)
            return
        expected = int(recorded[-1]["adapter_version"])
        if adapter is None:
            raise EvalConfigError(
                f"adapter {lora_id}, recorded in {self.lines_path}, is not on {self.url}; resume "
                "against the server the run used, or pass a new output_dir"
            )
        if adapter["current_version"] != expected:
            self.client.rollback(lora_id, expected)

    def _do(self, task: Task, clock: float) -> dict[str, Any]:
        started = time.monotonic()
        trained = Trained([], None, [])
        if task.step > 0:
            trained = self._train(task)
        metrics, probes = self._measure(task, trained.texts)
        adapter = self.client.get_adapter(task.lora_id) or {}
        return {
            "preference": task.preference.name,
            "stage": task.stage,
            "step": task.step,
            "global_step": task.global_step,
            "lora_id": task.lora_id,
            "adapter_version": adapter.get("current_version"),
            "timestamp": _now(),
            "elapsed_seconds": round(time.monotonic() - clock, 3),  # since this session began
            "seconds": round(time.monotonic() - started, 3),  # this step's wall time
            "metrics": metrics,
            "training": trained.training,
            "rollouts": trained.rollouts,
            "probes": probes,
        }

    def _train(self, task: Task) -> Trained:
        prompts = task.preference.training_prompts
        size = self.config.batch_size
        # A stage that brings a preference back goes on where its last stage stopped.
        start = (task.position - 1) * size
        batch = [prompts[(start + i) % len(prompts)] for i in range(size)]
        seeds = [
            derive_seed(self.config.seed, "rollout", task.preference.name, task.position, i)
            for i in range(size)
        ]
        answers = self.measurer.answers(task.lora_id, batch, seeds)
        preference = task.preference
        # An empty answer has nothing to train on (the server would refuse it): not sent.
        sent = [(p, a) for p, a in zip(batch, answers, strict=True) if a.tokens > 0]
        shown = {"example": preference.example} if preference.example is not None else {}
        rollouts = [
            {"prompt": p, "response": a.text, "feedback": preference.feedback, **shown}
            for p, a in sent
        ]
        texts = [a.text for a in answers]
        items = [self._item(a, preference) for _, a in sent]
        if not items:
            return Trained(rollouts, None, texts)
        status = self.client.feedback(items, self.config.feedback_timeout)
        training = _training_metrics(status)
        mode = training.get("divergence_mode")
        if isinstance(mode, str):
            self.divergence_mode = mode
        return Trained(rollouts, training if self.config.wants("training") else None, texts)

    def _item(self, answer: Answer, preference: Preference) -> dict[str, Any]:
        item: dict[str, Any] = {
            "completion_id": answer.completion_id,
            "feedback": preference.feedback,
        }
        if preference.example is not None:
            item["example"] = preference.example
        training = self.config.training.model_dump(mode="json", exclude_unset=True)
        if training:
            item["training"] = training
        return item

    def _measure(
        self, task: Task, sampled: list[str]
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Every measurement of the step, submitted together, then collected in a fixed order.

        `sampled` holds the texts the step has sampled already (its rollouts), for repetition.
        """
        config, model, measurer = self.config, task.lora_id, self.measurer
        due = task.step in (0, config.num_steps)
        compliance: dict[str, Pending[Any]] = {}
        groups: list[Pending[Any]] = []
        if config.wants("compliance"):
            compliance = {p.name: measurer.compliance(model, p) for p in task.measured}
        if config.wants("margin"):
            groups.append(measurer.margin(model, task.preference))
        if config.wants("capability") and (due or task.step % config.capability_steps == 0):
            groups.append(measurer.capability(model, self.questions))
        if config.wants("collapse") and (due or task.step % config.collapse_steps == 0):
            groups.append(measurer.collapse(model, task.preference))

        metrics: dict[str, float] = {}
        probes: list[dict[str, Any]] = []
        texts = list(sampled)
        for name, pending in compliance.items():
            found = pending.result()
            if name == task.preference.name:
                metrics.update(found.metrics)
                probes = found.probes
            if config.continual:
                metrics[f"compliance.{name}"] = found.metrics["compliance"]
            texts += found.texts
        for pending in groups:
            found = pending.result()
            metrics.update(found.metrics)
            texts += found.texts
        metrics.update(repetition(texts))
        self._relative(task, metrics)
        return metrics, probes

    def _relative(self, task: Task, metrics: dict[str, float]) -> None:
        """Ratios against baselines: capability against the adapter's first line, entropy and
        length against this preference's first baseline (this line, at its first step 0): a
        stage that brings it back carries on from its drift so far instead of hiding it."""
        adapter_lines = [line for line in self.lines if line["lora_id"] == task.lora_id]
        own = [line for line in adapter_lines if line["preference"] == task.preference.name]
        first = adapter_lines[0]["metrics"] if adapter_lines else metrics
        base = own[0]["metrics"] if own else metrics
        if "capability_accuracy" in metrics and first.get("capability_accuracy"):
            metrics["capability_ratio"] = (
                metrics["capability_accuracy"] / first["capability_accuracy"]
            )
        if "entropy" in metrics and base.get("entropy"):
            metrics["entropy_ratio"] = metrics["entropy"] / base["entropy"]
        if "mean_length" in metrics and base.get("mean_length"):
            metrics["length_drift"] = metrics["mean_length"] / base["mean_length"] - 1.0

    def _write_summary(self, status: str, error: str | None = None) -> None:
        plots = report.plot_run(self.run_dir, self.lines, [p.name for p in self.preferences])
        body = report.summary(
            run_id=self.config.run_id or "",
            status=status,
            started_at=self.started_at,
            updated_at=_now(),
            divergence_mode=self.divergence_mode,
            url=self.url,
            lora_ids=self.lora_ids,
            lines=self.lines,
            preferences=[p.name for p in self.preferences],
            stages=[p.name for p in self.stages],
            thresholds=self.config.thresholds,
            plots=[p for p in plots if (self.run_dir / p).exists()],
            continual=self.config.continual,
            error=error,
            changes_length={p.name for p in self.preferences if p.changes_length},
        )
        report.write_summary(self.run_dir, body)


@dataclass(frozen=True)
class Trained:
    """A step's training half: its rollouts as recorded, the engine's metrics (None when not
    asked for or nothing was sent), and the text of every answer sampled."""

    rollouts: list[dict[str, Any]]
    training: dict[str, Any] | None
    texts: list[str]


def _training_metrics(status: dict[str, Any]) -> dict[str, Any]:
    """The engine's scalar metrics of one trained feedback request, plus where it went."""
    metrics = status.get("metrics") or {}
    training: dict[str, Any] = {
        k: v for k, v in metrics.items() if isinstance(v, int | float | str) and k != "coalesced"
    }
    timings = metrics.get("timings")
    if isinstance(timings, dict):
        training["train_seconds"] = float(sum(timings.values()))
    training["feedback_id"] = status.get("feedback_id")
    training["version"] = status.get("version")
    return training


def load_or_explain(name: str) -> Preference:
    try:
        return load_preference(name)
    except ValueError as error:
        raise EvalConfigError(str(error)) from None


def run_eval(
    raw: dict[str, Any], *, url: str, api_key: str | None, data_dir: Path, label: str | None = None
) -> Path:
    """Run (or resume) an eval against the server at `url`; returns the run directory."""
    config, run_dir = resolve(raw, data_dir)
    return run_resolved(config, run_dir, url=url, api_key=api_key, label=label)


def run_resolved(
    config: EvalConfig, run_dir: Path, *, url: str, api_key: str | None, label: str | None = None
) -> Path:
    """`run_eval` for a config `resolve` has made (the caller needed it before the server)."""
    print(
        f"claas eval: run {config.run_id} in {run_dir} against {label or url} "
        f"(if stopped, resume with --output-dir {run_dir})",
        file=sys.stderr,
        flush=True,
    )
    client = ClaasClient(url, api_key, timeout=config.feedback_timeout)
    try:
        return EvalRun(config, run_dir, client, label or url).run()
    finally:
        client.close()
