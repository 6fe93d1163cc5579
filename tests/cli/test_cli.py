"""The `claas` commands that talk to a server (`adapters`, `feedback`, `chat`), run in-process
through `claas.cli.main` against a real server on 127.0.0.1 with the tiny Llama.

`claas chat` reads a scripted stdin; what it streams is checked against the rollouts the server
stored for it.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serving import (
    HELLO,
    HeldTraining,
    LiveServer,
    free_port,
)

from claas.cli import main
from claas.client import Client
from claas.records import Rollout
from claas.store import Store

QUICK = '{"steps_per_batch": 1}'


@pytest.fixture
def remote(shared: LiveServer) -> list[str]:
    """The flags that point a command at the server with alice's key."""
    return ["--url", shared.url, "--api-key", "sk-alice"]


@pytest.fixture
def alice(shared: LiveServer) -> Iterator[Client]:
    with Client(shared.url, "sk-alice") as claas:
        yield claas


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`claas ARGV...`: its exit code, stdout and stderr."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def answer(claas: Client, model: str, text: str = "Hello there!") -> tuple[str, str]:
    """A short greedy chat: its completion id and text."""
    with claas.openai() as chat:
        completion = chat.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": text}],
            max_tokens=8,
            temperature=0,
        )
    return completion.id, completion.choices[0].message.content or ""


# ---------------------------------------------------------------------------------------------
# claas adapters
# ---------------------------------------------------------------------------------------------


def test_adapters_commands(
    capsys: pytest.CaptureFixture[str], remote: list[str], tmp_path: Path
) -> None:
    code, out, _ = run(capsys, "adapters", "create", "alice/cli", "--rank", "4", *remote)
    assert code == 0
    created = json.loads(out)
    assert created["lora_id"] == "alice/cli" and created["rank"] == 4
    assert created["current_version"] == 1 and len(created["versions"]) == 1

    code, out, _ = run(capsys, "adapters", "list", "--prefix", "alice/c", *remote)
    assert code == 0 and [a["lora_id"] for a in json.loads(out)["data"]] == ["alice/cli"]
    code, out, _ = run(capsys, "adapters", "versions", "alice/cli", *remote)
    assert code == 0 and json.loads(out)["versions"][0]["version"] == 1
    code, out, _ = run(capsys, "adapters", "rollback", "alice/cli", "1", *remote)
    assert code == 0 and json.loads(out)["current_version"] == 1

    zipped = tmp_path / "cli.zip"
    code, out, _ = run(capsys, "adapters", "export", "alice/cli", "-o", str(zipped), *remote)
    assert code == 0 and out.startswith(f"wrote {zipped}")
    with zipfile.ZipFile(zipped) as archive:
        assert sorted(archive.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
    unpacked = tmp_path / "unpacked"
    code, out, _ = run(capsys, "adapters", "export", "alice/cli", "--dir", str(unpacked), *remote)
    assert code == 0 and f"into {unpacked}" in out
    config = json.loads((unpacked / "adapter_config.json").read_text())
    assert config["r"] == 4 and (unpacked / "adapter_model.safetensors").stat().st_size > 0

    code, out, _ = run(capsys, "adapters", "delete", "alice/cli", *remote)
    assert code == 0 and json.loads(out) == {
        "lora_id": "alice/cli",
        "deleted": True,
        "versions_removed": 1,
    }
    code, out, err = run(capsys, "adapters", "versions", "alice/cli", *remote)
    assert code == 1 and out == ""
    assert err.startswith("claas: error 404: adapter alice/cli does not exist")


def test_bad_input_and_access_are_reported(
    capsys: pytest.CaptureFixture[str], remote: list[str], shared: LiveServer
) -> None:
    with pytest.raises(SystemExit) as refused:  # argparse: checked before anything is sent
        main(["adapters", "versions", "not-an-id", *remote])
    assert refused.value.code == 2 and "owner/name" in capsys.readouterr().err

    bob = ["--url", shared.url, "--api-key", "sk-bob"]
    code, _, err = run(capsys, "adapters", "create", "alice/theirs", *bob)
    assert code == 1 and err.startswith("claas: error 403: ") and "bob" in err
    code, _, err = run(capsys, "adapters", "list", "--url", shared.url, "--api-key", "sk-x")
    assert code == 1 and "401: unknown API key" in err

    nowhere = f"http://127.0.0.1:{free_port()}"
    code, _, err = run(capsys, "adapters", "list", "--url", nowhere)
    assert code == 2 and f"no answer from the server at {nowhere}" in err


def test_url_and_key_from_the_environment(
    capsys: pytest.CaptureFixture[str], shared: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLAAS_URL", shared.url)
    monkeypatch.setenv("CLAAS_API_KEY", "sk-bob")
    code, out, _ = run(capsys, "adapters", "create", "bob/env", "--rank", "4")
    assert code == 0 and json.loads(out)["lora_id"] == "bob/env"
    code, out, _ = run(capsys, "adapters", "list")
    assert [a["lora_id"] for a in json.loads(out)["data"]] == ["bob/env"]


# ---------------------------------------------------------------------------------------------
# claas feedback
# ---------------------------------------------------------------------------------------------


def test_feedback_send_wait_status_and_log(
    capsys: pytest.CaptureFixture[str], remote: list[str], alice: Client
) -> None:
    alice.adapters.create("alice/fb", rank=4)
    completion_id, _ = answer(alice, "alice/fb")
    code, out, err = run(
        capsys,
        "feedback",
        "send",
        "--completion-id",
        completion_id,
        "--feedback",
        "Shorter please.",
        "--training",
        QUICK,
        "--wait",
        *remote,
    )
    assert code == 0, err
    headline, metrics = out.split("\n", 1)
    feedback_id = headline.split()[1]
    assert headline == f"feedback {feedback_id} done: alice/fb is now at version 2"
    shown = json.loads(metrics)
    assert shown["divergence_mode"] == "topk_gjs" and shown["samples"] == 1
    assert "teacher_texts" not in shown and "steps" not in shown

    code, out, _ = run(capsys, "feedback", "status", feedback_id, *remote)
    status = json.loads(out)
    assert code == 0 and status["version"] == 2 and len(status["metrics"]["steps"]) == 1

    # by text, without waiting: the request as queued
    prompt, response = "Name a colour.", answer(alice, "alice/fb", "Name a colour.")[1]
    code, out, _ = run(
        capsys,
        "feedback",
        "send",
        "--adapter",
        "alice/fb",
        "--prompt",
        prompt,
        "--response",
        response,
        "--feedback",
        "No colours.",
        "--training",
        QUICK,
        *remote,
    )
    queued = json.loads(out)
    assert code == 0 and queued["lora_id"] == "alice/fb"
    assert queued["status"] in ("queued", "running")
    assert alice.feedback.wait(queued["feedback_id"], timeout=300).version == 3

    code, out, _ = run(capsys, "feedback", "log", "alice/fb", *remote)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith(f"{queued['feedback_id']}  done     v3 ")
    assert lines[0].endswith("  No colours.")
    assert lines[1].startswith(f"{feedback_id}  done     v2 ")
    assert lines[1].endswith("  Shorter please.")
    code, out, _ = run(
        capsys, "feedback", "log", "alice/fb", "--limit", "1", "--offset", "1", *remote
    )
    assert out.splitlines() == lines[1:]
    alice.adapters.create("alice/quiet", rank=4)
    code, out, _ = run(capsys, "feedback", "log", "alice/quiet", *remote)
    assert code == 0 and out == "no feedback on alice/quiet yet\n"


@pytest.mark.parametrize(
    "naming",
    [
        pytest.param([], id="no answer named"),
        pytest.param(["--completion-id", "chatcmpl-x", "--adapter", "alice/fb"], id="both ways"),
        pytest.param(["--adapter", "alice/fb", "--prompt", "p"], id="texts without response"),
    ],
)
def test_feedback_send_names_one_answer(
    capsys: pytest.CaptureFixture[str], remote: list[str], naming: list[str]
) -> None:
    code, out, err = run(capsys, "feedback", "send", *naming, "--feedback", "x", *remote)
    assert code == 2 and out == ""
    assert "either with --completion-id, or with all of --adapter, --prompt and --response" in err


def test_feedback_send_wait_times_out(
    capsys: pytest.CaptureFixture[str],
    remote: list[str],
    alice: Client,
    shared: LiveServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held = HeldTraining(shared.runtime.queue.engine, monkeypatch)
    try:
        alice.adapters.create("alice/slow", rank=4)
        completion_id, _ = answer(alice, "alice/slow")
        argv = ["feedback", "send", "--completion-id", completion_id, "--feedback", "x"]
        code, out, err = run(capsys, *argv, "--wait", "--timeout", "0.3", *remote)
        assert code == 1 and out == ""
        assert "is still queued after 0.3 s" in err or "is still running after 0.3 s" in err
        feedback_id = err.split("feedback request ")[1].split()[0]
        assert f"`claas feedback status {feedback_id}`" in err
    finally:
        held.release()
    assert alice.feedback.wait(feedback_id, timeout=300).status == "done"


def test_a_failed_request_is_reported(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    remote: list[str],
    alice: Client,
    shared: LiveServer,
) -> None:
    alice.adapters.create("alice/fails", rank=4)
    completion_id, _ = answer(alice, "alice/fails")

    async def broken(*args: Any, **kwargs: Any) -> Any:  # one injected failure: the step
        raise RuntimeError("the accelerator fell over")

    monkeypatch.setattr(shared.runtime.queue.engine, "distill", broken)
    argv = ["feedback", "send", "--completion-id", completion_id, "--feedback", "x", "--wait"]
    code, out, err = run(capsys, *argv, *remote)
    assert code == 1 and out == ""
    assert err.startswith("claas: error: feedback fb-")
    assert "failed: training failed (RuntimeError: the accelerator fell over)" in err

    script = "Hi\n/feedback shorter\n"
    code, out, err = chat(capsys, monkeypatch, script, "alice/fails", "--max-tokens", "4", *remote)
    assert code == 0 and "now at version" not in out
    assert "claas: error: the feedback failed: training failed (RuntimeError" in err


# ---------------------------------------------------------------------------------------------
# claas chat
# ---------------------------------------------------------------------------------------------


class RolloutSpy:
    """Records every rollout the server stores: a spy on the real `Store.add_rollout`, so a test
    can read which messages and which adapter version each streamed answer came from."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rollouts: list[Rollout] = []
        add = store.add_rollout

        def recording(rollout: Rollout) -> Rollout:
            self.rollouts.append(add(rollout))
            return rollout

        monkeypatch.setattr(store, "add_rollout", recording)


def chat(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    script: str,
    *argv: str,
) -> tuple[int, str, str]:
    """`claas chat ARGV...` with `script` as what the user types."""
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    return run(capsys, "chat", *argv)


def test_chat_streams_keeps_the_conversation_and_trains_on_feedback(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    remote: list[str],
    alice: Client,
    shared: LiveServer,
) -> None:
    alice.adapters.create("alice/chat", rank=4)
    spy = RolloutSpy(shared.runtime.store, monkeypatch)
    script = "Hello there!\n/feedback shorter please\nHello again!\n/quit\nnever read\n"
    flags = ["--system", "Be brief.", "--temperature", "0", "--max-tokens", "8"]
    code, out, err = chat(capsys, monkeypatch, script, "alice/chat", *flags, *remote)
    assert code == 0, err
    assert "alice/chat is now at version 2; the next answer comes from it" in out

    first, second = spy.rollouts
    system = {"role": "system", "content": "Be brief."}
    assert first.messages == [system, HELLO[0]]
    assert (first.lora_id, first.adapter_version) == ("alice/chat", 1)
    assert second.messages == [
        system,
        HELLO[0],
        {"role": "assistant", "content": first.response_text},
        {"role": "user", "content": "Hello again!"},
    ]
    assert second.adapter_version == 2  # served by the version the feedback made
    assert second.sampling_params["temperature"] == 0 and len(second.response_tokens) <= 8
    for rollout in (first, second):  # streamed as sampled, then the usage chunk's counts
        tokens = f"[{len(rollout.prompt_tokens)} prompt + {len(rollout.response_tokens)} answer"
        assert f"alice/chat> {rollout.response_text}\n  {tokens} tokens]\n" in out

    (trained,) = alice.feedback.log("alice/chat")
    assert trained.items == [{"rollout_id": first.id, "feedback": "shorter please"}]


def test_chat_commands_errors_and_eof(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    remote: list[str],
    alice: Client,
    shared: LiveServer,
) -> None:
    alice.adapters.create("alice/reset", rank=4)
    spy = RolloutSpy(shared.runtime.store, monkeypatch)
    script = "/feedback too early\n/dance\n\nHi\n/feedback\n/reset\nHi again\n"  # then EOF
    code, out, err = chat(capsys, monkeypatch, script, "alice/reset", "--max-tokens", "4", *remote)
    assert code == 0, err
    assert "nothing to give feedback on yet: send a message first" in out
    assert "unknown command /dance; use /feedback TEXT, /reset or /quit" in out
    assert "say what to change: /feedback TEXT" in out and "(conversation cleared)" in out
    assert [r.messages for r in spy.rollouts] == [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Hi again"}],  # /reset forgot the first exchange
    ]
    assert alice.feedback.log("alice/reset") == []

    code, out, err = chat(capsys, monkeypatch, "Hi\n/feedback x\n", "alice/missing", *remote)
    assert code == 0  # the error is shown and the chat goes on until EOF
    assert err.startswith("claas: error 404: model 'alice/missing' does not exist; valid names")
    assert "nothing to give feedback on yet" in out  # the failed answer is not kept
