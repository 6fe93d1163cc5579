"""vLLM as the inference backend: chat is sampled by a running vLLM server, training stays put.

claas keeps training on the local service (or Tinker) and serves every adapter version from a
vLLM server that is managed outside claas (claas never starts or stops it). This module is one
more sampling backend behind the seam (`claas.services.protocol.SamplingService`): the chat
layer asks it for a sampling client by sampler path, exactly as it asks the training service.

- **Adapters.** A version's PEFT directory (the training service's `local_checkpoints`) is
  loaded into vLLM with `/v1/load_lora_adapter` under a name derived from its sampler path, so
  every version is its own vLLM model and `owner/name@N` stays exact. `preload` loads a version
  as soon as it is trained; anything vLLM does not have (after a vLLM restart, say) is loaded
  on first use. At most `keep_loaded` versions stay loaded; the least recently used is unloaded.
- **Sampling.** `/v1/completions` with the prompt as token ids (the same chat template as the
  local backend renders), `logprobs` always on, and `return_tokens_as_token_ids`, so a rollout
  stores vLLM's own token ids rather than a re-encoding of its text. A response whose ids and
  log-probs do not pair up is refused (`BackendError`), never stored. OpenAI's penalties and
  `logit_bias` pass through to vLLM, and `topk_sample_logprobs` is its `logprobs: k`.
- **Down.** A vLLM that cannot be reached gives `BackendUnavailable` (503, with what to check);
  `health()` reports it instead of raising.

    backend = VLLMBackend("http://127.0.0.1:8001", "SmolLM2", tokenizer, checkpoints=service)
    sampler = await backend.create_sampling_client(model_path=version.sampler_path)
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections import OrderedDict
from typing import Any, Literal

import httpx
import numpy as np
from tinker import types
from tinker.types.topk_logprobs import MASK_LOGPROB, TopkLogprobs
from transformers import PreTrainedTokenizerBase

from claas.errors import ClaasError
from claas.records import AdapterVersion
from claas.services.protocol import ChatSamplingParams, LocalCheckpoints, ServiceCapabilities

TOKEN_ID_PREFIX = "token_id:"


class BackendUnavailable(ClaasError):
    """The inference backend cannot be reached."""

    status_code = 503


class BackendError(ClaasError):
    """The inference backend answered something claas cannot use."""

    status_code = 502


def lora_name(sampler_path: str) -> str:
    """vLLM's name for one adapter version: stable, short, and free of path characters."""
    return "claas-" + hashlib.sha256(sampler_path.encode()).hexdigest()[:16]


class VLLMBackend:
    """Sampling clients served by a vLLM server's OpenAI API, with runtime-loaded LoRAs."""

    # vLLM's answers arrive whole here (no on_token); it applies penalties and logit_bias itself.
    capabilities = ServiceCapabilities(logit_rules=True)

    def __init__(
        self,
        url: str,
        base_model: str,
        tokenizer: PreTrainedTokenizerBase,
        checkpoints: LocalCheckpoints,
        api_key: str | None = None,
        keep_loaded: int = 8,
        timeout: float = 600.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.base_model = base_model  # vLLM's name of the base model (its --served-model-name)
        self.tokenizer = tokenizer
        self.checkpoints = checkpoints
        self.keep_loaded = keep_loaded
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)
        self._loaded: OrderedDict[str, str] = OrderedDict()  # lora name -> sampler path
        self._lock = asyncio.Lock()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- the seam ---------------------------------------------------------------------------
    async def create_sampling_client(
        self, model_path: str | None = None, base_model: str | None = None
    ) -> VLLMSamplingClient:
        if model_path is None:
            return VLLMSamplingClient(self, self.base_model, None)
        await self.preload(model_path)
        return VLLMSamplingClient(self, lora_name(model_path), model_path)

    # -- adapters ---------------------------------------------------------------------------
    async def preload(self, sampler_path: str) -> None:
        """Load one adapter version into vLLM (a no-op if claas loaded it already)."""
        name = lora_name(sampler_path)
        async with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return
            await self._load(name, sampler_path)
            while len(self._loaded) > self.keep_loaded:
                old, _ = self._loaded.popitem(last=False)
                await self._post("/v1/unload_lora_adapter", {"lora_name": old}, missing_ok=True)

    async def load_version(self, version: AdapterVersion) -> None:
        """Load a just-trained version, so its first chat does not wait for the load."""
        await self.preload(version.sampler_path)

    async def reload(self, sampler_path: str) -> None:
        """Load again a version vLLM says it does not have (it restarted since)."""
        name = lora_name(sampler_path)
        async with self._lock:
            self._loaded.pop(name, None)
            await self._load(name, sampler_path)

    async def _load(self, name: str, sampler_path: str) -> None:
        directory = self.checkpoints.checkpoint_dir(sampler_path)
        body = {"lora_name": name, "lora_path": str(directory)}
        await self._post("/v1/load_lora_adapter", body, missing_ok=False, exists_ok=True)
        self._loaded[name] = sampler_path

    # -- health -----------------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        """`{"status": "ok" | "unreachable" | "error", "url", "loaded_adapters", ...}`."""
        report: dict[str, Any] = {"url": self.url, "loaded_adapters": len(self._loaded)}
        try:
            response = await self._http.get("/health", timeout=5.0)
        except httpx.HTTPError as error:
            return {**report, "status": "unreachable", "error": f"{type(error).__name__}"}
        status = "ok" if response.status_code == 200 else "error"
        return {**report, "status": status, "http_status": response.status_code}

    # -- HTTP -------------------------------------------------------------------------------
    async def _post(
        self,
        path: str,
        body: dict[str, Any],
        missing_ok: bool = False,
        exists_ok: bool = False,
    ) -> httpx.Response:
        try:
            response = await self._http.post(path, json=body)
        except httpx.HTTPError as error:
            raise BackendUnavailable(
                f"the vLLM server at {self.url} cannot be reached ({type(error).__name__}); "
                "check that it is running (claas never starts it) and that --vllm-url is right"
            ) from error
        if response.status_code < 400:
            return response
        text = response.text
        if exists_ok and "already" in text.lower():
            return response
        if missing_ok and response.status_code == 404:
            return response
        raise BackendError(f"vLLM answered {path} with {response.status_code}: {text[:500]}", {})

    async def complete(self, body: dict[str, Any], sampler_path: str | None) -> dict[str, Any]:
        """POST /v1/completions; a LoRA vLLM lost (a restart) is loaded again, once."""
        try:
            response = await self._post("/v1/completions", body)
        except BackendError as error:
            unknown_model = "does not exist" in str(error) or "not found" in str(error).lower()
            if sampler_path is None or not unknown_model:
                raise
            await self.reload(sampler_path)
            response = await self._post("/v1/completions", body)
        result: dict[str, Any] = response.json()
        return result


class VLLMSamplingClient:
    """One model of the vLLM server (the base, or one adapter version) as a sampling client."""

    def __init__(self, backend: VLLMBackend, model: str, sampler_path: str | None) -> None:
        self.backend = backend
        self.model = model
        self.sampler_path = sampler_path

    async def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: types.TensorData | None = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> types.SampleResponse:
        if include_prompt_logprobs or topk_prompt_logprobs or target_prompt_logprobs is not None:
            raise BackendError("the vLLM backend serves chat; prompt scoring stays on training")
        params = sampling_params
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt.to_ints(),
            "n": num_samples,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            # The sampled token's log-prob, plus the k likeliest with topk_sample_logprobs.
            "logprobs": topk_sample_logprobs,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": False,
        }
        if params.top_k is not None and params.top_k > 0:
            body["top_k"] = params.top_k
        if params.seed is not None:
            body["seed"] = params.seed
        if isinstance(params, ChatSamplingParams) and params.has_logit_rules:
            body["presence_penalty"] = params.presence_penalty
            body["frequency_penalty"] = params.frequency_penalty
            body["logit_bias"] = {str(i): v for i, v in params.logit_bias.items()}
        stop = params.stop
        if stop:
            if all(isinstance(s, int) for s in stop):
                body["stop_token_ids"] = list(stop)
            else:
                body["stop"] = [str(s) for s in stop]
        result = await self.backend.complete(body, self.sampler_path)
        return types.SampleResponse(
            sequences=[
                sequence(choice, topk_sample_logprobs) for choice in result.get("choices", [])
            ]
        )

    async def compute_logprobs(
        self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> list[float | None]:
        ids = prompt.to_ints()
        body = {
            "model": self.model,
            "prompt": ids,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": 0,
        }
        result = await self.backend.complete(body, self.sampler_path)
        rows = result["choices"][0].get("prompt_logprobs") or []
        values: list[float | None] = [None]
        for token, row in zip(ids[1:], rows[1:], strict=False):
            entry = (row or {}).get(str(token))
            values.append(None if entry is None else float(entry["logprob"]))
        if len(values) != len(ids):
            raise BackendError(f"vLLM scored {len(values)} of {len(ids)} prompt tokens")
        return values

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return self.backend.tokenizer


def sequence(choice: dict[str, Any], topk: int = 0) -> types.SampledSequence:
    """One vLLM completion choice as Tinker's sampled sequence: vLLM's own ids and log-probs
    (and, with `topk`, the k likeliest tokens per step)."""
    logprobs = choice.get("logprobs") or {}
    names = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    if len(names) != len(values):
        raise BackendError(
            f"vLLM returned {len(names)} tokens but {len(values)} log-probs; the rollout "
            "would not line up, so it is not stored"
        )
    tokens = [_token_id(name) for name in names]
    stop_reason: Literal["length", "stop"] = (
        "length" if choice.get("finish_reason") == "length" else "stop"
    )
    return types.SampledSequence(
        stop_reason=stop_reason,
        sequence_id=f"seq-{uuid.uuid4().hex}",
        tokens_np=np.asarray(tokens, dtype=np.int32),
        logprobs_np=np.asarray([float(v) for v in values], dtype=np.float32),
        topk_logprobs_np=_topk(logprobs.get("top_logprobs") or [], len(tokens), topk)
        if topk
        else None,
    )


def _token_id(name: object) -> int:
    if not str(name).startswith(TOKEN_ID_PREFIX):
        raise BackendError(
            f"vLLM returned the token {name!r} as text, not as an id; it must run a "
            "version that supports return_tokens_as_token_ids"
        )
    return int(str(name)[len(TOKEN_ID_PREFIX) :])


def _topk(rows: list[dict[str, float] | None], length: int, k: int) -> TopkLogprobs:
    """vLLM's per-step {token: log-prob} dicts (the sampled token plus the top k) as Tinker's
    dense (tokens, k) matrices, the k likeliest per step."""
    if len(rows) != length:
        raise BackendError(f"vLLM returned top log-probs for {len(rows)} of {length} tokens")
    ids = np.zeros((length, k), dtype=np.int32)
    values = np.full((length, k), MASK_LOGPROB, dtype=np.float32)
    for step, row in enumerate(rows):
        best = sorted((row or {}).items(), key=lambda item: -item[1])[:k]
        for rank, (name, logprob) in enumerate(best):
            ids[step, rank], values[step, rank] = _token_id(name), logprob
    return TopkLogprobs(token_ids=ids, logprobs=values)
