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
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from claas.client import (
    AdapterDetail,
    Client,
    FeedbackItem,
    FeedbackTimeout,
    FeedbackView,
    NotFoundError,
)
from claas.errors import TrainingFailed
from claas.eval import report
from claas.eval.capability import load_capability_set
from claas.eval.collapse import repetition
from claas.eval.config import EvalConfig, EvalConfigError, dump_config, resolve
from claas.eval.measure import Answer, Measurer, Pending, derive_seed
from claas.eval.plan import Task, distinct, load_stages, plan
from claas.eval.preferences import Preference
from claas.records import PENDING
from claas.runs import Probe, Rollout, RunStatus, RunSummary, Scalar, StepLine, read_steps

# The longest the server holds a `wait=true` feedback call; a longer wait polls after it.
_SERVER_WAIT = 3600.0
PLOT_SECONDS = 30.0  # while a run goes on, its PNGs are redrawn at most this often


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def repair_lines(path: Path) -> list[StepLine]:
    """steps.jsonl's complete lines; the file rewritten without a torn last line (a kill
    mid-write) so that appends start clean."""
    try:
        lines = read_steps(path)
    except ValueError as error:  # a bad line before the last: not a kill's doing
        raise EvalConfigError(f"{error}; repair that line, or pass a new output_dir") from None
    if path.exists() and len(path.read_text(encoding="utf-8").splitlines()) != len(lines):
        report.write_atomic(path, "".join(line.dump() + "\n" for line in lines))
    return lines


def append_line(path: Path, line: StepLine) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(line.dump() + "\n")
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def logs_above_the_bar() -> Iterator[None]:
    """While the progress bar is live, Python warnings (a library's FutureWarning) and log
    records are written above it through `tqdm.write` instead of through its line."""
    shown = warnings.showwarning
    logging.captureWarnings(True)  # warnings become records of the `py.warnings` logger
    turned_on = warnings.showwarning is not shown
    try:
        with logging_redirect_tqdm([logging.getLogger(), logging.getLogger("uvicorn")]):
            yield
    finally:
        if turned_on:
            logging.captureWarnings(False)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class EvalRun:
    def __init__(self, config: EvalConfig, run_dir: Path, claas: Client, url: str) -> None:
        self.config = config
        self.run_dir = run_dir
        self.claas = claas
        self.url = url
        self.stages = load_stages(config)
        self.preferences = distinct(self.stages)
        self.questions = load_capability_set()
        self.tasks = plan(config, self.stages)
        self.lines_path = run_dir / "steps.jsonl"
        self.lines: list[StepLine] = []
        self.started_at = _now()
        # The first plots: PLOT_SECONDS into the run, or at its end if it ends sooner.
        self._plotted_at = time.monotonic()
        self.divergence_mode: str = config.training.divergence_mode
        self.measurer = Measurer(claas, config)

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
            with contextlib.suppress(ValueError):
                summary = RunSummary.model_validate_json(previous.read_bytes())
                self.started_at = summary.started_at
        for line in self.lines:
            mode = (line.training or {}).get("divergence_mode")
            self.divergence_mode = mode if isinstance(mode, str) else self.divergence_mode
        clock = time.monotonic()
        try:
            self._write_summary("running")
            todo = self.tasks[len(self.lines) :]
            ready: set[str] = set()
            with (
                tqdm(
                    total=len(self.tasks), initial=len(self.lines), desc="claas eval", unit="step"
                ) as bar,
                logs_above_the_bar(),
            ):
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
                        compliance=f"{line.metrics.get('compliance', float('nan')):.2f}",
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
            name = line.preference
            only = stages_of.get(name, [])
            stage = line.stage if line.stage is not None else (only[0] if len(only) == 1 else None)
            if (name, stage, line.step) != (task.preference.name, task.stage, task.step):
                raise EvalConfigError(
                    f"{self.lines_path} line {index + 1} is {name} stage {stage} step "
                    f"{line.step}, but this run's plan has {task.preference.name} stage "
                    f"{task.stage} step {task.step} there; use a new output_dir"
                )

    def _prepare_adapter(self, lora_id: str) -> None:
        """Make the adapter's current version the one its last recorded line measured."""
        recorded = [line for line in self.lines if line.lora_id == lora_id]
        adapter = self._adapter(lora_id)
        if adapter is not None:
            self._wait_idle(lora_id)
            adapter = self._adapter(lora_id)
        if not recorded:
            if adapter is not None:  # made by a run killed before its baseline was written
                self.claas.adapters.delete(lora_id)
            spec = self.config.adapter.model_dump(mode="json", exclude_unset=True)
            # From the seed and the role, not the run id: runs compared on one seed start alike.
            role = lora_id.removeprefix(f"{self.config.owner}/{self.config.run_id}-")
            spec.setdefault("seed", derive_seed(self.config.seed, "adapter", role))
            self.claas.adapters.create(lora_id, **spec)
            return
        expected = recorded[-1].adapter_version
        if adapter is None:
            raise EvalConfigError(
                f"adapter {lora_id}, recorded in {self.lines_path}, is not on {self.url}; resume "
                "against the server the run used, or pass a new output_dir"
            )
        if expected is not None and adapter.current_version != expected:
            self.claas.adapters.rollback(lora_id, expected)

    def _adapter(self, lora_id: str) -> AdapterDetail | None:
        try:
            return self.claas.adapters.get(lora_id)
        except NotFoundError:
            return None

    def _wait_idle(self, lora_id: str) -> None:
        """Wait until no feedback for `lora_id` is queued or running (a killed run's last);
        FeedbackTimeout after `feedback_timeout` seconds."""
        timeout = self.config.feedback_timeout
        deadline = time.monotonic() + timeout
        while pending := self.claas.feedback.log(lora_id, statuses=PENDING):
            left = max(deadline - time.monotonic(), 0.0)
            try:
                self.claas.feedback.wait(pending[-1].feedback_id, timeout=left, interval=1.0)
            except FeedbackTimeout as waited:  # say how long in all, not the last part
                raise FeedbackTimeout(waited.feedback, timeout) from None

    def _send(self, items: list[FeedbackItem]) -> FeedbackView:
        """Send one feedback request and wait until it is trained; TrainingFailed if it failed,
        FeedbackTimeout after `feedback_timeout` seconds."""
        timeout = self.config.feedback_timeout
        try:
            done = self.claas.feedback.send_and_wait(*items, timeout=min(timeout, _SERVER_WAIT))
        except FeedbackTimeout as waited:  # the server's wait ran out first
            done = self.claas.feedback.wait(waited.feedback.feedback_id, timeout, interval=1.0)
        if done.status == "failed":
            raise TrainingFailed(f"feedback {done.feedback_id} failed to train: {done.error}")
        return done

    def _do(self, task: Task, clock: float) -> StepLine:
        started = time.monotonic()
        trained = Trained([], None, [])
        if task.step > 0:
            trained = self._train(task)
        metrics, probes = self._measure(task, trained.texts)
        adapter = self._adapter(task.lora_id)
        return StepLine(
            preference=task.preference.name,
            stage=task.stage,
            step=task.step,
            global_step=task.global_step,
            lora_id=task.lora_id,
            adapter_version=adapter.current_version if adapter is not None else None,
            timestamp=_now(),
            elapsed_seconds=round(time.monotonic() - clock, 3),  # since this session began
            seconds=round(time.monotonic() - started, 3),  # this step's wall time
            metrics=metrics,
            training=trained.training,
            rollouts=trained.rollouts,
            probes=probes,
        )

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
            Rollout(prompt=p, response=a.text, feedback=preference.feedback, **shown)
            for p, a in sent
        ]
        texts = [a.text for a in answers]
        items = [self._item(a, preference) for _, a in sent]
        if not items:
            return Trained(rollouts, None, texts)
        training = _training_metrics(self._send(items))
        mode = training.get("divergence_mode")
        if isinstance(mode, str):
            self.divergence_mode = mode
        return Trained(rollouts, training if self.config.wants("training") else None, texts)

    def _item(self, answer: Answer, preference: Preference) -> FeedbackItem:
        training = self.config.training.model_dump(mode="json", exclude_unset=True)
        return FeedbackItem(
            completion_id=answer.completion_id,
            feedback=preference.feedback,
            example=preference.example,
            training=training or None,
        )

    def _measure(self, task: Task, sampled: list[str]) -> tuple[dict[str, float], list[Probe]]:
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
        probes: list[Probe] = []
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
        adapter_lines = [line for line in self.lines if line.lora_id == task.lora_id]
        own = [line for line in adapter_lines if line.preference == task.preference.name]
        first = adapter_lines[0].metrics if adapter_lines else metrics
        base = own[0].metrics if own else metrics
        if "capability_accuracy" in metrics and first.get("capability_accuracy"):
            metrics["capability_ratio"] = (
                metrics["capability_accuracy"] / first["capability_accuracy"]
            )
        if "entropy" in metrics and base.get("entropy"):
            metrics["entropy_ratio"] = metrics["entropy"] / base["entropy"]
        if "mean_length" in metrics and base.get("mean_length"):
            metrics["length_drift"] = metrics["mean_length"] / base["mean_length"] - 1.0

    def _write_summary(self, status: RunStatus, error: str | None = None) -> None:
        # Plots cost more than a quick step (1.5 s for the four): they are redrawn at most every
        # PLOT_SECONDS while the run goes on, and by its last summary; no step, nothing to draw.
        now = time.monotonic()
        if self.lines and (status != "running" or now - self._plotted_at >= PLOT_SECONDS):
            report.plot_run(self.run_dir, self.lines, [p.name for p in self.preferences])
            self._plotted_at = now
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
            plots=[p for p in report.PLOTS if (self.run_dir / p).exists()],
            continual=self.config.continual,
            error=error,
            changes_length={p.name for p in self.preferences if p.changes_length},
        )
        report.write_summary(self.run_dir, body)


@dataclass(frozen=True)
class Trained:
    """A step's training half: its rollouts as recorded, the engine's metrics (None when not
    asked for or nothing was sent), and the text of every answer sampled."""

    rollouts: list[Rollout]
    training: dict[str, Scalar] | None
    texts: list[str]


def _training_metrics(done: FeedbackView) -> dict[str, Scalar]:
    """The engine's scalar metrics of one trained feedback request, plus where it went."""
    metrics = done.metrics
    training: dict[str, Scalar] = {
        k: v for k, v in metrics.items() if isinstance(v, int | float | str) and k != "coalesced"
    }
    timings = metrics.get("timings")
    if isinstance(timings, dict):
        training["train_seconds"] = float(sum(timings.values()))
    training["feedback_id"] = done.feedback_id
    training["version"] = done.version
    return training


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
    with Client(url, api_key, timeout=config.feedback_timeout) as claas:
        return EvalRun(config, run_dir, claas, label or url).run()
