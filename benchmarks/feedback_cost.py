"""What one feedback request costs at the shipped defaults, against the defaults before #22.

The README's quickstart, through the real HTTP API of an in-process server on the embedded
model: create an adapter, a greedy 64-token answer, one feedback request ("Way too long. Answer
in one short sentence."), the answer again. Two training configs, alternated on fresh adapters
so that load on the machine falls on both alike:

- **before #22**: 4 optimizer steps, no replay (main's defaults until this change; the code path
  is the same, since fresh answers and replay are skipped when there is nothing to sample);
- **shipped**: the defaults of this checkout (`TrainingConfig()`).

A third case, **shipped, with replay**, sends the quickstart's request to an adapter that was
taught two other feedback texts first, so its request also re-teaches two remembered lessons on
fresh answers: the cost of memory once there is some.

It prints, per case, the median seconds of the request as the server timed it, its phases
(sampling, teacher scoring, the optimizer steps, the final scoring, saving), the answer's tokens
before and after, and the ratio of each case's median to before-#22's.

    .venv/bin/python benchmarks/feedback_cost.py [--repeats 3] [--url http://127.0.0.1:8000]

With `--url` it uses a running server (no API keys) instead of starting one: on a 2-core machine
a second model process would compete with the first for the same cores.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import uuid
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from claas.eval.server import InProcessServer
from claas.settings import Settings

QUESTION = [{"role": "user", "content": "Explain how a rainbow forms."}]
FEEDBACK = "Way too long. Answer in one short sentence."
EARLIER = [  # taught before the "with replay" case's request, so its memory holds them
    ("Who are you?", "Your name is Kuro, always introduce yourself as Kuro"),
    ("Write a tweet about Mondays.", "Don't use any emojis in your responses"),
]
BEFORE_22: dict[str, Any] = {"steps_per_batch": 4, "replay": 0}
PHASES = ("sampling", "teacher_scoring", "train", "final_scoring", "save")


def answer(client: httpx.Client, lora_id: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    body = {"model": lora_id, "messages": messages, "max_tokens": 64, "temperature": 0}
    response = client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    return dict(response.json())


def teach(
    client: httpx.Client, lora_id: str, completion_id: str, feedback: str, training: dict[str, Any]
) -> dict[str, Any]:
    item: dict[str, Any] = {"completion_id": completion_id, "feedback": feedback}
    if training:
        item["training"] = training
    response = client.post("/v1/feedback?wait=true", json={"items": [item]}, timeout=1800)
    response.raise_for_status()
    done = dict(response.json())
    if done["status"] != "done":
        raise RuntimeError(f"feedback failed: {done.get('error')}")
    return done


def run_case(
    client: httpx.Client, name: str, index: str, training: dict[str, Any]
) -> dict[str, Any]:
    slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    lora_id = f"bench/{slug}-{index}"
    client.post("/v1/adapters", json={"lora_id": lora_id, "seed": 1}).raise_for_status()
    if name == "shipped, with replay":
        for prompt, feedback in EARLIER:
            first = answer(client, lora_id, [{"role": "user", "content": prompt}])
            teach(client, lora_id, first["id"], feedback, training)
    before = answer(client, lora_id, QUESTION)
    done = teach(client, lora_id, before["id"], FEEDBACK, training)
    after = answer(client, lora_id, QUESTION)
    timings = done["metrics"]["timings"]
    return {
        "seconds": sum(timings.values()),
        "phases": {phase: timings.get(phase, 0.0) for phase in PHASES},
        "replayed": done["metrics"].get("replayed", 0),
        "tokens": (before["usage"]["completion_tokens"], after["usage"]["completion_tokens"]),
        "finish": after["choices"][0]["finish_reason"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--url", help="a running claas server without API keys")
    args = parser.parse_args()
    cases = {"before #22": BEFORE_22, "shipped": {}, "shipped, with replay": {}}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
    run = uuid.uuid4().hex[:6]  # adapters of its own on a shared server
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            data_dir = stack.enter_context(tempfile.TemporaryDirectory())
            settings = Settings(data_dir=Path(data_dir), log_level="warning")
            url = stack.enter_context(InProcessServer(settings))
        client = stack.enter_context(httpx.Client(base_url=url, timeout=600))
        jobs = [(i, name) for i in range(args.repeats) for name in cases]
        for index, name in tqdm(jobs, desc="feedback requests", unit="case"):
            results[name].append(run_case(client, name, f"{run}-{index}", cases[name]))
    baseline = statistics.median(r["seconds"] for r in results["before #22"])
    print(f"{'case':<22} {'median s':>8} {'ratio':>6}  " + " ".join(f"{p:>14}" for p in PHASES))
    for name, runs in results.items():
        median = statistics.median(r["seconds"] for r in runs)
        phases = " ".join(
            f"{statistics.median(r['phases'][p] for r in runs):>14.2f}" for p in PHASES
        )
        print(f"{name:<22} {median:>8.2f} {median / baseline:>6.2f}  {phases}")
    for name, runs in results.items():
        shown = ", ".join(f"{a}->{b} {r['finish']}" for r in runs for a, b in [r["tokens"]])
        replayed = sorted({r["replayed"] for r in runs})
        print(f"{name}: answer tokens {shown}; lessons replayed {replayed}")


if __name__ == "__main__":
    main()
