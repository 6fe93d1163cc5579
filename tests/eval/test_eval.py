"""`claas eval`: config, verifiers, shipped data, and whole runs against a real server.

The runs go through `claas.eval.server.InProcessServer` (the app under uvicorn on 127.0.0.1, a
free port) on the tiny random Llama, over real HTTP, with few probes and tokens to stay fast.
The tiny model's answers are noise, so the runs check the machinery and the on-disk format,
not learning.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
import yaml
from matplotlib.figure import Figure
from pydantic import ValidationError
from tqdm import tqdm

from claas.cli import main
from claas.client import Client, FeedbackItem
from claas.eval.capability import is_correct, load_capability_set
from claas.eval.collapse import (
    distinct_n,
    entropy_estimate,
    repetition,
    repetition_rate,
    self_rouge_l,
)
from claas.eval.compare import compare_figure, load_run
from claas.eval.config import (
    AlertThresholds,
    EvalConfig,
    EvalConfigError,
    dump_config,
    load_config,
)
from claas.eval.measure import chat
from claas.eval.plan import check_stages, with_examples
from claas.eval.preferences import Preference, load_preference, shipped_preferences
from claas.eval.report import PLOTS, alerts, compliance_of, format_seconds, whole_steps
from claas.eval.runner import logs_above_the_bar, run_eval
from claas.eval.seeds import KEY_COLUMNS, SeedsReport, Spread
from claas.eval.server import InProcessServer
from claas.eval.verifiers import build_verifier
from claas.models import tiny_llama
from claas.runs import StepLine, read_steps, read_summary
from claas.settings import Settings

pytestmark = pytest.mark.heavy

QUICK: dict[str, Any] = {
    "num_steps": 2,
    "batch_size": 2,
    "max_tokens": 8,
    "capability_max_tokens": 4,
    "probe_limit": 3,
    "capability_limit": 4,
    "collapse_probes": 2,
    "collapse_samples": 2,
    "collapse_steps": 1,
    "training": {"steps_per_batch": 1},
    "adapter": {"rank": 4},
}
EVALS = Path(__file__).parents[2] / "benchmarks" / "evals"
SUMMARY_KEYS = {
    "run_id",
    "status",
    "started_at",
    "updated_at",
    "divergence_mode",
    "url",
    "lora_ids",
    "table",
    "plots",
}


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_file_and_overrides(tmp_path: Path) -> None:
    config_file = tmp_path / "eval.yaml"
    config_file.write_text("num_steps: 3\ntraining:\n  alpha: 0.3\npreferences: [no_emoji]\n")
    config = load_config(
        config_file,
        [
            "training.learning_rate=1e-4",
            "continual=true",
            "preferences=[concise, identity]",
            "thresholds.max_self_rouge_l=0.9",
        ],
    )
    assert config.num_steps == 3 and config.continual is True
    assert config.preferences == ["concise", "identity"]  # the override wins
    assert config.training.alpha == 0.3 and config.training.learning_rate == 1e-4
    assert config.thresholds.max_self_rouge_l == 0.9
    assert config.batch_size == 4  # the default
    # Unset training fields stay unset (the server's defaults apply), also once written out.
    assert config.training.model_fields_set == {"alpha", "learning_rate"}
    dumped = EvalConfig.model_validate(yaml.safe_load(dump_config(config)))
    assert dumped.training.model_fields_set == {"alpha", "learning_rate"}


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["trainng.learning_rate=1e-4"], "unknown key 'trainng'; valid keys here: adapter"),
        (["training.lr=1"], "unknown key 'training.lr'; valid keys here: alpha"),
        (["num_steps=-1"], "num_steps"),
        (["metrics=[compliance, vibes]"], "metrics.1"),
        (["num_steps"], "not key=value"),
        (["owner=no/slash"], "owner"),
    ],
)
def test_config_errors_say_what_to_fix(overrides: list[str], says: str) -> None:
    with pytest.raises(EvalConfigError) as raised:
        load_config(None, overrides)
    assert says in str(raised.value)


def test_examples_by_preference_name() -> None:
    config = load_config(None, ["examples.identity=I'm Kuro, your assistant."])
    assert config.examples == {"identity": "I'm Kuro, your assistant."}
    with pytest.raises(EvalConfigError, match=r"examples\.identity: Value error, example is empty"):
        load_config(None, ["examples.identity=' '"])
    concise, identity = load_preference("concise"), load_preference("identity")
    assert identity.example is None
    taught = with_examples([concise, identity], {"identity": "I'm Kuro."})
    assert [p.example for p in taught] == [None, "I'm Kuro."]
    with pytest.raises(EvalConfigError, match=r"examples name 'identiy', which this run does not"):
        with_examples([concise, identity], {"identiy": "I'm Kuro."})


def test_a_preference_repeats_only_in_a_continual_run() -> None:
    concise, identity = load_preference("concise"), load_preference("identity")
    stages = [concise, identity, concise]
    names = ["concise", "identity", "concise"]
    check_stages(EvalConfig(preferences=names, continual=True), stages)
    with pytest.raises(EvalConfigError, match=r"concise more than once; .* set continual=true"):
        check_stages(EvalConfig(preferences=names), stages)
    other = identity.model_copy(update={"name": "concise"})
    with pytest.raises(EvalConfigError, match="two different preferences named 'concise'"):
        check_stages(EvalConfig(preferences=names, continual=True), [concise, identity, other])


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(EvalConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", [])
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(EvalConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml", [])


# ---------------------------------------------------------------------------------------------
# Verifiers: each can pass and each can fail
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "finish", "expected"),
    [
        ("A rainbow is sunlight split by raindrops.", "stop", 1.0),
        ("One. Two. Three.", "stop", 1.0),
        ("One. Two. Three. Four. Five. Six.", "stop", 0.5),
        ("- one\n- two\n- three\n- four\n- five\n- six", "stop", 0.5),  # list items count
        ("A rainbow is sunlight split by", "length", 0.0),  # cut at max_tokens: not concise
        (" ".join(["word"] * 120) + ".", "stop", 0.5),  # one sentence, twice too many words
        ("", "stop", 0.0),
    ],
)
def test_concise_verifier(text: str, finish: str, expected: float) -> None:
    assert build_verifier("concise", {}).score(text, finish) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Happy birthday! Have a great day.", 1.0),
        ("Happy birthday! 🎉", 0.0),
        ("Love you ❤️", 0.0),
        ("Thumbs up 👍🏽", 0.0),
        ("Prices rose 5% :) this year", 1.0),  # an ASCII smiley is not an emoji
    ],
)
def test_no_emoji_verifier(text: str, expected: float) -> None:
    assert build_verifier("no_emoji", {}).score(text, "stop") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I'm Kuro, nice to meet you.", 1.0),
        ("Hello! I am Kuro.", 1.0),
        ("my name is kuro", 1.0),
        ("Kuro here! How can I help?", 1.0),
        ("Hi, I’m Kuro.", 1.0),  # a typographic apostrophe
        ("You can call me Kuro.", 1.0),
        ("Kuro is a dog's name.", 0.0),
        ("I'm Kuro's assistant.", 0.0),
        ("I am not Kuro.", 0.0),
        ("I'm Kurosawa.", 0.0),
        ("I'm an AI assistant.", 0.0),
    ],
)
def test_identity_verifier(text: str, expected: float) -> None:
    assert build_verifier("identity", {"name": "Kuro"}).score(text, "stop") == expected


def test_verifier_errors() -> None:
    with pytest.raises(ValueError, match="unknown verifier 'polite'; use one of concise"):
        build_verifier("polite", {})
    with pytest.raises(ValueError, match="max_sentences"):
        build_verifier("concise", {"max_sentences": 0})
    with pytest.raises(ValueError, match="nmae"):
        build_verifier("identity", {"nmae": "Kuro"})


# ---------------------------------------------------------------------------------------------
# Shipped data
# ---------------------------------------------------------------------------------------------


def test_shipped_preferences_hold_out_their_probes() -> None:
    assert shipped_preferences() == ["concise", "identity", "no_emoji"]
    for name in shipped_preferences():
        preference = load_preference(name)
        assert preference.name == name
        assert len(preference.probes) >= 12 and len(preference.training_prompts) >= 12
        assert not set(preference.probes) & set(preference.training_prompts)
        assert preference.pairs
        verifier = preference.build_verifier()
        for pair in preference.pairs:  # the pairs agree with the verifier
            assert verifier.score(pair.preferred, "stop") > verifier.score(
                pair.dispreferred, "stop"
            )


def test_user_preference_files(tmp_path: Path) -> None:
    raw = load_preference("identity").model_dump()
    raw["name"] = "mine"
    raw["training_prompts"] = [*raw["training_prompts"], raw["probes"][0]]
    with pytest.raises(ValidationError, match="held out"):
        Preference.model_validate(raw)
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nfeedback: x\n")
    with pytest.raises(ValueError, match=r"mine.yaml: verifier: Field required"):
        load_preference(str(path))
    with pytest.raises(ValueError, match="neither shipped"):
        load_preference("no-such-preference")


def test_capability_set() -> None:
    questions = load_capability_set()
    assert len(questions) >= 30
    assert len({q.question for q in questions}) == len(questions)
    assert is_correct("The answer is 72.", ["72"])
    assert is_correct("There are 1,000 grams in a kilogram.", ["1000"])
    assert is_correct("It's Carbon Dioxide!", ["carbon dioxide"])
    assert not is_correct("720", ["72"])
    assert not is_correct("1.72", ["72"])
    assert not is_correct("Parisian", ["paris"])


def test_collapse_indicators() -> None:
    assert entropy_estimate([[-1.0, -2.0], [-3.0]]) == pytest.approx(2.0)
    assert entropy_estimate([[]]) is None
    assert self_rouge_l([["the cat sat", "the cat sat"]]) == pytest.approx(1.0)
    assert self_rouge_l([["the cat sat", "dogs run fast"]]) == pytest.approx(0.0)
    assert distinct_n(["a b a b"], 1) == pytest.approx(0.5)
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert distinct_n(["a"], 2) is None


def test_repetition_rate() -> None:
    assert repetition_rate("lazy lazy lazy lazy lazy lazy") == pytest.approx(3 / 4)
    assert repetition_rate("Lazy lazy LAZY lazy") == pytest.approx(1 / 2)  # lower-cased
    assert repetition_rate("a b c a b c") == pytest.approx(1 / 4)  # "a b c" comes back once
    # A normal sentence: one 3-gram of its 11 ("sat on the") comes back.
    text = "The cat sat on the mat and the dog sat on the rug."
    assert repetition_rate(text) == pytest.approx(1 / 11)
    assert repetition_rate("a b c a b c", n=2) == pytest.approx(2 / 5)
    assert repetition_rate("one two three") == 0.0  # fewer than n + 1 words
    assert repetition_rate("") == 0.0
    assert repetition(["lazy lazy lazy lazy lazy lazy", "a b c d"]) == {
        "repetition_max": pytest.approx(3 / 4),
        "repetition_mean": pytest.approx(3 / 8),
    }
    assert repetition([]) == {}


def _step(preference: str, step: int, metrics: dict[str, float]) -> StepLine:
    """A step line with the fields alerts read; the others are placeholders."""
    return StepLine(
        preference=preference,
        step=step,
        lora_id=f"eval/run-{preference}",
        adapter_version=step + 1,
        timestamp="2026-01-01T00:00:00+00:00",
        elapsed_seconds=0.0,
        metrics=metrics,
        training=None,
        rollouts=[],
        probes=[],
    )


def test_repetition_alerts_on_a_degenerate_step() -> None:
    lines = [
        _step("concise", 0, {"repetition_mean": 0.6}),  # baseline
        # One answer of many in a loop, as the base model does by itself now and then.
        _step("concise", 1, {"repetition_mean": 0.02, "repetition_max": 0.7}),
        _step("concise", 2, {"repetition_mean": 0.4, "repetition_max": 0.9}),
    ]
    found = alerts(lines, AlertThresholds())
    assert [(a.step, a.metric, a.value) for a in found] == [(2, "repetition_mean", 0.4)]
    assert found[0].message == "repetition_mean 0.4 is above 0.25"
    assert alerts(lines, AlertThresholds(max_repetition=0.5)) == []


# ---------------------------------------------------------------------------------------------
# Whole runs on the tiny model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[str]:
    # A fresh tiny model, not the session's: the server's adapters change the model it serves.
    data_dir = tmp_path_factory.mktemp("eval-server")
    loaded = tiny_llama(model_cache, seed=0)
    concurrency = EvalConfig().concurrency  # as `claas eval` starts it: no 429 for the eval
    with InProcessServer(
        Settings(data_dir=data_dir), loaded=loaded, concurrency=concurrency
    ) as url:
        yield url


@pytest.fixture(scope="module")
def finished_run(live: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("eval-data")
    raw = {**QUICK, "preferences": ["concise", "no_emoji"], "seed": 7}
    return run_eval(raw, url=live, api_key=None, data_dir=data_dir)


def _lines(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]


def test_a_run_writes_the_documented_files(finished_run: Path, live: str) -> None:
    assert finished_run.parent.name == "evals" and finished_run.name.startswith("eval-")
    summary = json.loads((finished_run / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert summary["status"] == "done" and summary["run_id"] == finished_run.name
    assert summary["url"] == live and summary["divergence_mode"] == "topk_gjs"
    run_id = summary["run_id"]
    assert summary["lora_ids"] == [f"eval/{run_id}-concise", f"eval/{run_id}-no_emoji"]
    assert sorted(summary["plots"]) == sorted(PLOTS)
    for plot in PLOTS:
        assert (finished_run / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [row["preference"] for row in summary["table"]] == ["concise", "no_emoji"]
    for row in summary["table"]:
        assert {"baseline_compliance", "final_compliance", "retention", "steps_to_0.8"} <= set(row)
        assert all(not isinstance(v, dict | list) for v in row.values())  # flat rows

    lines = _lines(finished_run)
    assert [(line["preference"], line["stage"], line["step"]) for line in lines] == [
        (name, stage, step)
        for stage, name in enumerate(("concise", "no_emoji"))
        for step in range(3)
    ]
    assert summary["stages"] == ["concise", "no_emoji"]
    assert all(line["seconds"] > 0 for line in lines)
    assert summary["run_seconds"] == pytest.approx(sum(line["seconds"] for line in lines))
    for line in lines:
        assert all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in line["metrics"].values()
        )
        assert {"compliance", "margin_per_token", "margin_sum", "mean_length"} <= set(
            line["metrics"]
        )
        assert {
            "capability_accuracy",
            "entropy",
            "self_rouge_l",
            "distinct_1",
            "distinct_2",
            "repetition_max",
            "repetition_mean",
        } <= set(line["metrics"])
        assert len(line["probes"]) == QUICK["probe_limit"]
        assert all(set(p) >= {"prompt", "response", "score"} for p in line["probes"])
        if line["step"] == 0:
            assert line["training"] is None and line["rollouts"] == []
            assert line["adapter_version"] == 1
        else:
            assert len(line["rollouts"]) == QUICK["batch_size"]
            assert {r["feedback"] for r in line["rollouts"]} == {
                load_preference(line["preference"]).feedback
            }
            training = line["training"]
            assert training["divergence_mode"] == "topk_gjs"
            assert training["steps_per_batch_applied"] == 1  # the override reached the server
            assert {"loss", "mean_is_ratio", "feedback_id"} <= set(training)
            assert line["adapter_version"] == training["version"] == line["step"] + 1
    config = (finished_run / "config.yaml").read_text()
    assert f"run_id: {run_id}" in config and "steps_per_batch: 1" in config


def test_chats_over_the_servers_generation_limit_wait_for_a_slot(live: str) -> None:
    limit = EvalConfig().concurrency  # the live server's limit per owner
    with Client(live) as claas, claas.openai() as chat_client:
        claas.adapters.create("eval/slots", rank=4)
        # Without the openai client's own retries, every 429 reaches the eval's wait.
        unretried = chat_client.with_options(max_retries=0)
        with ThreadPoolExecutor(2 * limit) as pool:
            answers = list(
                pool.map(
                    lambda i: chat(
                        unretried,
                        "eval/slots",
                        f"Count to {i}.",
                        max_tokens=8,
                        temperature=1.0,
                        seed=i,
                        patience=600.0,
                    ),
                    range(2 * limit),
                )
            )
    assert len({answer.completion_id for answer in answers}) == 2 * limit


def test_resume_rolls_back_an_unrecorded_step(
    finished_run: Path, live: str, tmp_path: Path
) -> None:
    run_dir = tmp_path / "resumed"
    shutil.copytree(finished_run, run_dir)
    # Lines written before stages and step times were recorded: they resume all the same.
    old = [
        {k: v for k, v in json.loads(line).items() if k not in ("stage", "seconds")}
        for line in (run_dir / "steps.jsonl").read_text().splitlines()
    ]
    lines = [json.dumps(line) + "\n" for line in old]
    # The last step trained version 3 of the adapter but its line was lost, and a kill tore
    # the line after it.
    (run_dir / "steps.jsonl").write_text("".join(lines[:-1]) + '{"preference": "no_em')
    lora_id = json.loads(lines[-1])["lora_id"]
    # And the killed run's next feedback request is still queued on the server: the resume must
    # wait for it, else it would land on top of the rolled-back adapter.
    with Client(live) as claas, claas.openai() as chat_client:
        answer = chat(
            chat_client, lora_id, "Hello!", max_tokens=4, temperature=1.0, seed=1, patience=60.0
        )
        item = FeedbackItem(
            completion_id=answer.completion_id, feedback="x", training={"steps_per_batch": 1}
        )
        queued = claas.feedback.send(item)
        assert queued.status == "queued"

        run_eval({"output_dir": str(run_dir)}, url=live, api_key=None, data_dir=tmp_path)

        adapter = claas.adapters.get(lora_id)

    resumed = _lines(run_dir)
    assert len(resumed) == len(lines)
    assert resumed[:-1] == [json.loads(line) for line in lines[:-1]]  # done steps were kept
    assert (resumed[-1]["preference"], resumed[-1]["step"]) == ("no_emoji", 2)
    # Versions 3 (the lost step) and 4 (the queued request) were rolled back past; the redone
    # step trained version 5 from version 2.
    assert resumed[-1]["adapter_version"] == resumed[-1]["training"]["version"] == 5
    assert adapter.current_version == 5
    assert [v.version for v in adapter.versions] == [1, 2, 3, 4, 5]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "done"
    assert resumed[-1]["stage"] == 1
    assert summary["run_seconds"] == resumed[-1]["seconds"]  # the old lines count 0

    run_eval({"output_dir": str(run_dir)}, url=live, api_key=None, data_dir=tmp_path)
    assert _lines(run_dir) == resumed  # a finished run resumes to nothing

    with pytest.raises(EvalConfigError, match="other values for num_steps"):
        run_eval(
            {"output_dir": str(run_dir), "num_steps": 5}, url=live, api_key=None, data_dir=tmp_path
        )


IDENTITY_EXAMPLE = "I'm Kuro, your assistant."
CONCISE_EXAMPLE = "Rain falls when drops in a cloud grow too heavy to float."
TINY_CONTINUAL = [
    "num_steps=1",
    "batch_size=2",
    "max_tokens=8",
    "capability_max_tokens=4",
    "probe_limit=2",
    "capability_limit=2",
    "training.steps_per_batch=1",
    "adapter.rank=4",
    "continual=true",
    "metrics=[compliance, margin, capability, training]",
]


@pytest.fixture(scope="module")
def continual_runs(live: str, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two continual runs (seeds 3 and 4) of concise → identity → concise from the command
    line: identity from a YAML file with an example of its own, concise's example from the
    config."""
    folder = tmp_path_factory.mktemp("continual")
    identity = folder / "identity.yaml"
    identity.write_text(
        yaml.safe_dump({**load_preference("identity").model_dump(), "example": IDENTITY_EXAMPLE})
    )
    runs = []
    for seed in (3, 4):
        run_dir = folder / f"seed-{seed}"
        overrides = [
            *TINY_CONTINUAL,
            f"seed={seed}",
            f"preferences=[concise, {identity}, concise]",
            f"examples.concise={CONCISE_EXAMPLE}",
        ]
        assert main(["eval", "--url", live, "--output-dir", str(run_dir), *overrides]) == 0
        runs.append(run_dir)
    return runs


def test_continual_stages_bring_a_preference_back(
    continual_runs: list[Path], live: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = continual_runs[0]
    lines = _lines(run_dir)
    assert [
        (line["preference"], line["stage"], line["step"], line["global_step"]) for line in lines
    ] == [
        ("concise", 0, 0, 0),
        ("concise", 0, 1, 1),
        ("identity", 1, 0, 1),
        ("identity", 1, 1, 2),
        ("concise", 2, 0, 2),
        ("concise", 2, 1, 3),
    ]
    assert len({line["lora_id"] for line in lines}) == 1
    assert [line["adapter_version"] for line in lines] == [1, 2, 2, 3, 3, 4]
    # Concise's second stage goes on through its training prompts, where the first stopped.
    prompts = load_preference("concise").training_prompts
    assert [r["prompt"] for r in lines[1]["rollouts"]] == prompts[0:2]
    assert [r["prompt"] for r in lines[5]["rollouts"]] == prompts[2:4]
    # Every step measures each preference taught so far, once.
    measured = [sorted(k for k in line["metrics"] if k.startswith("compliance.")) for line in lines]
    assert (
        measured
        == [["compliance.concise"]] * 2 + [["compliance.concise", "compliance.identity"]] * 4
    )
    assert "entropy" not in lines[3]["metrics"]  # collapse was not asked for
    for line in lines:
        # Without collapse samples, a step's answers are its probes (one per measured
        # preference, only the taught one's recorded), capability answers and rollouts.
        recorded = [p["response"] for p in line["probes"]] + [
            r["response"] for r in line["rollouts"]
        ]
        metrics = line["metrics"]
        assert metrics["repetition_max"] >= max(map(repetition_rate, recorded))
        assert 0 <= metrics["repetition_mean"] <= metrics["repetition_max"] <= 1
        assert line["seconds"] > 0

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["continual"] is True and len(summary["lora_ids"]) == 1
    assert summary["stages"] == ["concise", "identity", "concise"]
    rows = {row["preference"]: row for row in summary["table"]}
    assert list(rows) == ["concise", "identity"]
    concise = rows["concise"]
    assert concise["steps"] == 2 and rows["identity"]["steps"] == 1
    assert concise["baseline_compliance"] == lines[0]["metrics"]["compliance"]
    assert concise["final_compliance"] == lines[-1]["metrics"]["compliance.concise"]
    typed = read_steps(run_dir / "steps.jsonl")
    values = [c for line in typed if (c := compliance_of(line, "concise")) is not None]
    assert concise["peak_compliance"] == max(values)
    if concise["peak_compliance"]:
        assert concise["retention"] == concise["final_compliance"] / concise["peak_compliance"]
    trained = [line for line in lines if line["preference"] == "concise" and line["step"] > 0]
    # The tiny model may get every capability question wrong: then there is no ratio at all.
    ratios = [r for line in trained if (r := line["metrics"].get("capability_ratio")) is not None]
    assert concise["min_capability_ratio"] == (min(ratios) if ratios else None)
    assert all("capability_accuracy" in line["metrics"] for line in lines)
    assert concise["repetition_max"] == max(line["metrics"]["repetition_max"] for line in trained)
    assert summary["run_seconds"] == pytest.approx(sum(line["seconds"] for line in lines))

    # A finished run resumes to nothing, and prints its summary and run time again.
    assert main(["eval", "--url", live, "--output-dir", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    assert "baseline_compliance" in printed and f"wrote {run_dir}" in printed
    assert f"run time {format_seconds(summary['run_seconds'])}" in printed
    assert _lines(run_dir) == lines


def test_examples_reach_the_server(continual_runs: list[Path], live: str) -> None:
    expected = {"concise": CONCISE_EXAMPLE, "identity": IDENTITY_EXAMPLE}
    trained = [line for line in _lines(continual_runs[0]) if line["step"] > 0]
    with Client(live) as claas:
        for line in trained:
            request = claas.feedback.status(line["training"]["feedback_id"])
            examples = {item.get("example") for item in request.items}
            assert examples == {expected[line["preference"]]}, line["preference"]
            assert {r["example"] for r in line["rollouts"]} == {expected[line["preference"]]}


def test_seeds_gives_mean_and_spread(
    continual_runs: list[Path],
    finished_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "seeds" / "seeds.json"
    assert main(["eval", "seeds", *map(str, continual_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    found = SeedsReport.model_validate_json(out.read_text())
    summaries = [json.loads((run / "summary.json").read_text()) for run in continual_runs]
    runs_lines = [_lines(run) for run in continual_runs]

    assert [run.seed for run in found.runs] == [3, 4]
    assert [run.run_seconds for run in found.runs] == [s["run_seconds"] for s in summaries]
    assert found.stages == ["concise", "identity", "concise"] and found.continual
    assert [p.preference for p in found.preferences] == ["concise", "identity"]

    def spread(values: list[Any]) -> tuple[float, float, float, int]:
        present = [v for v in values if v is not None]
        return sum(present) / len(present), min(present), max(present), len(present)

    for preference in found.preferences:
        rows = [
            next(r for r in s["table"] if r["preference"] == preference.preference)
            for s in summaries
        ]
        for column in KEY_COLUMNS:
            values = [row[column] for row in rows]
            got = preference.columns[column]
            if all(v is None for v in values):
                assert got.runs == 0 and got.mean is None
                continue
            mean, low, high, runs = spread(values)
            assert got.mean == pytest.approx(mean), column
            assert (got.min, got.max, got.runs) == (low, high, runs), column
        # Compliance after each request: on the first line at that global step measuring it.
        for step, got in preference.compliance_by_step.items():
            values = [
                next(
                    c
                    for line in lines
                    if line["global_step"] == step
                    and (c := compliance_of(StepLine.model_validate(line), preference.preference))
                    is not None
                )
                for lines in runs_lines
            ]
            assert (got.mean, got.min, got.max) == (pytest.approx(sum(values) / 2), *sorted(values))
    # The tiny model's compliance stays 0, but its margins differ between seeds: a real spread.
    margin = found.preferences[0].columns["margin_per_token_final"]
    assert margin.min is not None and margin.max is not None and margin.min < margin.max
    assert sorted(found.preferences[0].compliance_by_step) == [1, 2, 3]
    assert sorted(found.preferences[1].compliance_by_step) == [1, 2, 3]  # from its baseline on

    steps = {step.global_step: step.values for step in found.steps}
    assert list(steps) == [0, 1, 2, 3]
    assert set(steps[3]) - {"capability_ratio"} == {"compliance.concise", "compliance.identity"}
    for step, spreads in steps.items():
        ratios = [
            r
            for lines in runs_lines
            if (
                r := next(line for line in lines if line["global_step"] == step)["metrics"].get(
                    "capability_ratio"
                )
            )
            is not None
        ]
        assert spreads.get("capability_ratio", Spread.of([])).runs == len(ratios)

    assert "seed" in printed and "min_capability_ratio" in printed
    assert "compliance.identity" in printed and f"wrote {out}" in printed
    run_time = format_seconds(summaries[0]["run_seconds"])
    assert run_time in printed

    # Runs of other preferences, and a single run, are refused.
    assert main(["eval", "seeds", str(continual_runs[0]), str(finished_run)]) == 2
    assert "pass runs of one config that differ only in seed" in capsys.readouterr().err
    assert main(["eval", "seeds", str(continual_runs[0])]) == 2
    assert "at least two runs" in capsys.readouterr().err


def test_compare_prints_a_table(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    shutil.copytree(finished_run, other)
    out = tmp_path / "plots" / "compare.png"
    assert main(["eval", "compare", str(finished_run), str(other), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "steps to 0.8 A" in printed and "final capability B" in printed
    rows = [line.split()[0] for line in printed.splitlines()[5:] if line.strip()]
    assert rows[:2] == ["concise", "no_emoji"]
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_compare_names_each_curve_by_preference_and_mode(finished_run: Path) -> None:
    run = load_run(finished_run)
    figure = compare_figure([run, run])
    compliance = figure.axes[0]
    legend = compliance.get_legend()
    assert legend is not None
    labels = [text.get_text() for text in legend.get_texts()]
    assert labels == [
        f"{name}, topk_gjs ({side})" for side in "AB" for name in ("concise", "no_emoji")
    ]
    low, high = compliance.get_xlim()
    assert [t for t in compliance.get_xticks() if low <= t <= high] == [0, 1, 2]  # no 0.5


def test_a_step_axis_shows_whole_steps_on_a_one_step_run() -> None:
    ax = Figure().subplots()
    ax.plot([1], [0.5], marker="o")  # one point: matplotlib pads the view to 0.945-1.055
    whole_steps(ax)
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks == [1.0]


def test_every_run_on_disk_reads_as_the_run_format() -> None:
    """Every run in benchmarks/evals, whichever claas wrote it, reads back as `RunSummary` and
    `StepLine`s, and a line written back is the line that was read."""
    runs = sorted(path.parent for path in EVALS.glob("*/summary.json"))
    assert runs, f"no runs under {EVALS}"
    for run_dir in runs:
        summary = read_summary(run_dir)
        raw = [line for line in (run_dir / "steps.jsonl").read_text().splitlines() if line]
        lines = read_steps(run_dir / "steps.jsonl")
        assert len(lines) == len(raw) == summary.steps_recorded, run_dir.name
        assert [json.loads(line.dump()) for line in lines] == [json.loads(r) for r in raw]
        assert set(summary.lora_ids) == {line.lora_id for line in lines}


def test_warnings_go_above_the_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    """A library's warning while the bar is live is written by `tqdm.write`, on a line of its
    own above the bar, not into the bar's line."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with tqdm(total=2, file=sys.stderr) as bar, logs_above_the_bar():
            bar.update(1)
            with patch.object(tqdm, "write", wraps=tqdm.write) as written:
                warnings.warn("`foo` is deprecated", FutureWarning, stacklevel=1)
            bar.update(1)
    assert any(
        "FutureWarning: `foo` is deprecated" in str(c.args[0]) for c in written.call_args_list
    )
    assert "FutureWarning" in capsys.readouterr().err


def test_cli_refuses_bad_input_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "http://127.0.0.1:9"  # nothing is contacted: the config is refused first
    assert main(["eval", "--url", url, "--data-dir", str(tmp_path), "num_stesp=3"]) == 2
    assert "unknown key 'num_stesp'" in capsys.readouterr().err
    assert main(["eval", "compare", str(tmp_path)]) == 2
    assert "usage: claas eval compare RUN_A RUN_B" in capsys.readouterr().err
    assert main(["eval", "compare", str(tmp_path), str(tmp_path)]) == 2
    assert "is not a claas eval run" in capsys.readouterr().err
    repeated = ["eval", "--url", url, "--data-dir", str(tmp_path), "preferences=[concise,concise]"]
    assert main(repeated) == 2
    assert "concise more than once" in capsys.readouterr().err


def test_the_in_process_server_lets_the_eval_batch(tmp_path: Path) -> None:
    # Not started: only the settings it would serve with.
    default = Settings(data_dir=tmp_path)
    assert default.max_concurrent_generations_per_owner < EvalConfig().concurrency
    server = InProcessServer(default, concurrency=EvalConfig().concurrency)
    assert server.settings.max_concurrent_generations_per_owner == EvalConfig().concurrency
    roomy = Settings(data_dir=tmp_path, max_concurrent_generations_per_owner=32)
    assert InProcessServer(roomy, concurrency=8).settings.max_concurrent_generations_per_owner == 32


def test_length_drift_is_no_alert_for_a_preference_that_changes_length() -> None:
    lines = [
        _step("concise", 1, {"length_drift": -0.85}),
        _step("identity", 1, {"length_drift": -0.85}),
    ]
    found = alerts(lines, AlertThresholds(), changes_length={"concise"})
    assert [(a.preference, a.metric) for a in found] == [("identity", "abs_length_drift")]
    assert len(alerts(lines, AlertThresholds())) == 2
    assert load_preference("concise").changes_length
    assert not load_preference("identity").changes_length
