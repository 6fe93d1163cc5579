"""The eval's view of a claas server: only its public HTTP API.

Chat goes through the official `openai` client (what a user of claas would use); adapters,
feedback and scoring, which OpenAI's API has no words for, through httpx. Every server error is
raised as `ServerError` with the server's own message, which says what to do next.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import openai

from claas.errors import ClaasError


class ServerError(ClaasError):
    """The claas server refused or failed a call the eval depends on."""


@dataclass(frozen=True)
class Answer:
    """One sampled chat answer."""

    completion_id: str
    text: str
    finish_reason: str
    tokens: int
    logprobs: list[float]


class ClaasClient:
    def __init__(self, url: str, api_key: str | None, timeout: float = 1800.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        # Retries ride out a lost connection or a 5xx; a 429 is waited out in `chat`.
        self.chat_client = openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=api_key or "unused", max_retries=8, timeout=timeout
        )

    def close(self) -> None:
        self.http.close()
        self.chat_client.close()

    # -- chat -------------------------------------------------------------------------------
    def chat(
        self,
        model: str,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float,
        seed: int,
        logprobs: bool = False,
    ) -> Answer:
        # A 429 says this owner has as many generations running as the server allows
        # (CLAAS_MAX_CONCURRENT_GENERATIONS_PER_OWNER, which the eval's concurrency may exceed):
        # wait for a slot, as long as any request may take, instead of failing the run.
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                completion = self.chat_client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=max_tokens,
                    temperature=temperature,
                    seed=seed,
                    logprobs=logprobs,
                )
                break
            except openai.RateLimitError as error:
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"chat with {model} waited {self.timeout:.0f} s for a generation slot "
                        f"({_message(error.response)}); lower concurrency"
                    ) from None
                time.sleep(_retry_after(error.response.headers))
            except openai.APIStatusError as error:
                message = _message(error.response)
                raise ServerError(f"chat with {model} failed: {message}") from None
            except openai.APIConnectionError as error:
                raise ServerError(
                    f"cannot reach the claas server at {self.url} ({error}); start it with "
                    "`claas serve`, or run `claas eval` without --url for an in-process server"
                ) from None
        choice = completion.choices[0]
        content = choice.logprobs.content if choice.logprobs is not None else None
        return Answer(
            completion_id=completion.id,
            text=choice.message.content or "",
            finish_reason=choice.finish_reason,
            tokens=completion.usage.completion_tokens if completion.usage else 0,
            logprobs=[float(t.logprob) for t in content or []],
        )

    # -- score, adapters, feedback ------------------------------------------------------------
    def score(self, model: str, prompt: str, completion: str) -> list[float]:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "completion": completion,
        }
        return [float(lp) for lp in self._call("POST", "/v1/score", json=body)["logprobs"]]

    def get_adapter(self, lora_id: str) -> dict[str, Any] | None:
        response = self.http.get(f"/v1/adapters/{lora_id}")
        if response.status_code == 404:
            return None
        return self._check(response)

    def create_adapter(self, lora_id: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/v1/adapters", json={"lora_id": lora_id, **spec})

    def delete_adapter(self, lora_id: str) -> None:
        self._call("DELETE", f"/v1/adapters/{lora_id}")

    def rollback(self, lora_id: str, version: int) -> dict[str, Any]:
        return self._call("POST", f"/v1/adapters/{lora_id}/rollback", json={"version": version})

    def feedback(self, items: list[dict[str, Any]], timeout: float) -> dict[str, Any]:
        """Send one feedback request and wait until it is trained; its final status."""
        status = self._call(
            "POST",
            "/v1/feedback",
            params={"wait": "true", "timeout": min(timeout, 3600.0)},
            json={"items": items},
        )
        deadline = time.monotonic() + timeout
        while status["status"] not in ("done", "failed"):  # the server's wait timed out
            if time.monotonic() > deadline:
                raise ServerError(
                    f"feedback {status['feedback_id']} not trained after {timeout:.0f} s; raise "
                    "feedback_timeout, or check the server's queue"
                )
            time.sleep(1.0)
            status = {
                "feedback_id": status["feedback_id"],
                **self._call("GET", f"/v1/feedback/{status['feedback_id']}"),
            }
        if status["status"] == "failed":
            raise ServerError(
                f"feedback {status['feedback_id']} failed to train: {status.get('error')}"
            )
        return status

    def wait_idle(self, lora_id: str, timeout: float) -> None:
        """Wait until no feedback for `lora_id` is queued or running (a killed run's last)."""
        deadline = time.monotonic() + timeout
        while True:
            log = self._call("GET", "/v1/feedback", params={"lora_id": lora_id, "limit": 50})
            if not any(entry["status"] in ("queued", "running") for entry in log["data"]):
                return
            if time.monotonic() > deadline:
                raise ServerError(
                    f"feedback for {lora_id} is still queued or running after {timeout:.0f} s; "
                    "wait for it (claas feedback status) and re-run to resume"
                )
            time.sleep(1.0)

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise ServerError(
                f"cannot reach the claas server at {self.url} ({error}); start it with "
                "`claas serve`, or run `claas eval` without --url for an in-process server"
            ) from None
        return self._check(response)

    def _check(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            raise ServerError(
                f"{response.request.method} {response.request.url.path} answered "
                f"{response.status_code}: {_message(response)}"
            )
        body: dict[str, Any] = response.json()
        return body


class _Response(Protocol):
    """httpx's response, or the one the openai client carries (its own httpx fork)."""

    @property
    def text(self) -> str: ...

    def json(self) -> Any: ...


def _retry_after(headers: Mapping[str, str]) -> float:
    """The seconds a 429 asks to wait (1 when it does not say), within [0.1, 30]."""
    try:
        return min(max(float(headers.get("retry-after", "1")), 0.1), 30.0)
    except ValueError:
        return 1.0


def _message(response: _Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500]
