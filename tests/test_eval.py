"""`claas eval`: config, verifiers, shipped data, and whole runs against a real server.

The runs go through `claas.eval.server.InProcessServer` (the app under uvicorn on 127.0.0.1, a
free port) on the tiny random Llama, over real HTTP, with few probes and tokens to stay fast.
The tiny model's answers are noise, so the runs check the machinery and the on-disk format,
not learning.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from claas.cli import main
from claas.eval.capability import is_correct, load_capability_set
from claas.eval.client import ClaasClient
from claas.eval.collapse import distinct_n, entropy_estimate, self_rouge_l
from claas.eval.config import EvalConfig, EvalConfigError, dump_config, load_config
from claas.eval.preferences import Preference, load_preference, shipped_preferences
from claas.eval.report import PLOTS
from claas.eval.runner import run_eval
from claas.eval.server import InProcessServer
from claas.eval.verifiers import build_verifier
from claas.models import tiny_llama
from claas.settings import Settings

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


# ---------------------------------------------------------------------------------------------
# Whole runs on the tiny model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[str]:
    # A fresh tiny model, not the session's: the server's adapters change the model it serves.
    data_dir = tmp_path_factory.mktemp("eval-server")
    loaded = tiny_llama(model_cache, seed=0)
    with InProcessServer(Settings(data_dir=data_dir), loaded=loaded) as url:
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
    assert [(line["preference"], line["step"]) for line in lines] == [
        (name, step) for name in ("concise", "no_emoji") for step in range(3)
    ]
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


def test_resume_rolls_back_an_unrecorded_step(
    finished_run: Path, live: str, tmp_path: Path
) -> None:
    run_dir = tmp_path / "resumed"
    shutil.copytree(finished_run, run_dir)
    lines = (run_dir / "steps.jsonl").read_text().splitlines(keepends=True)
    # The last step trained version 3 of the adapter but its line was lost, and a kill tore
    # the line after it.
    (run_dir / "steps.jsonl").write_text("".join(lines[:-1]) + '{"preference": "no_em')
    lora_id = json.loads(lines[-1])["lora_id"]
    # And the killed run's next feedback request is still queued on the server: the resume must
    # wait for it, else it would land on top of the rolled-back adapter.
    client = ClaasClient(live, None)
    try:
        answer = client.chat(lora_id, "Hello!", max_tokens=4, temperature=1.0, seed=1)
        item = {"completion_id": answer.completion_id, "feedback": "x"}
        queued = client.http.post(
            "/v1/feedback", json={"items": [{**item, "training": {"steps_per_batch": 1}}]}
        )
        assert queued.status_code == 202, queued.text

        run_eval({"output_dir": str(run_dir)}, url=live, api_key=None, data_dir=tmp_path)

        adapter = client.get_adapter(lora_id)
    finally:
        client.close()

    resumed = _lines(run_dir)
    assert len(resumed) == len(lines)
    assert resumed[:-1] == [json.loads(line) for line in lines[:-1]]  # done steps were kept
    assert (resumed[-1]["preference"], resumed[-1]["step"]) == ("no_emoji", 2)
    # Versions 3 (the lost step) and 4 (the queued request) were rolled back past; the redone
    # step trained version 5 from version 2.
    assert resumed[-1]["adapter_version"] == resumed[-1]["training"]["version"] == 5
    assert adapter is not None and adapter["current_version"] == 5
    assert [v["version"] for v in adapter["versions"]] == [1, 2, 3, 4, 5]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "done"

    run_eval({"output_dir": str(run_dir)}, url=live, api_key=None, data_dir=tmp_path)
    assert _lines(run_dir) == resumed  # a finished run resumes to nothing

    with pytest.raises(EvalConfigError, match="other values for num_steps"):
        run_eval(
            {"output_dir": str(run_dir), "num_steps": 5}, url=live, api_key=None, data_dir=tmp_path
        )


def test_continual_from_the_command_line(
    live: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "continual"
    quick = [f"{key}={value}" for key, value in QUICK.items() if not isinstance(value, dict)]
    overrides = [
        *quick,
        "training.steps_per_batch=1",
        "adapter.rank=4",
        "num_steps=1",
        "continual=true",
        "preferences=[concise, identity]",
        "metrics=[compliance, capability, training]",
    ]
    assert main(["eval", "--url", live, "--output-dir", str(run_dir), *overrides]) == 0
    printed = capsys.readouterr().out
    assert "baseline_compliance" in printed and f"wrote {run_dir}" in printed
    lines = _lines(run_dir)
    assert [(line["preference"], line["step"], line["global_step"]) for line in lines] == [
        ("concise", 0, 0),
        ("concise", 1, 1),
        ("identity", 0, 1),
        ("identity", 1, 2),
    ]
    assert len({line["lora_id"] for line in lines}) == 1
    assert set(lines[1]["metrics"]) >= {"compliance", "compliance.concise"}
    assert set(lines[3]["metrics"]) >= {"compliance.concise", "compliance.identity"}
    assert "margin_per_token" not in lines[3]["metrics"]  # not asked for
    assert [line["adapter_version"] for line in lines] == [1, 2, 2, 3]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["continual"] is True and len(summary["lora_ids"]) == 1
    assert {row["preference"] for row in summary["table"]} == {"concise", "identity"}


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


def test_length_drift_is_no_alert_for_a_preference_that_changes_length() -> None:
    from claas.eval.config import AlertThresholds
    from claas.eval.report import alerts

    lines: list[Any] = [
        {"preference": "concise", "step": 1, "metrics": {"length_drift": -0.85}},
        {"preference": "identity", "step": 1, "metrics": {"length_drift": -0.85}},
    ]
    found = alerts(lines, AlertThresholds(), changes_length={"concise"})
    assert [(a["preference"], a["metric"]) for a in found] == [("identity", "abs_length_drift")]
    assert len(alerts(lines, AlertThresholds())) == 2
    assert load_preference("concise").changes_length
    assert not load_preference("identity").changes_length
