"""Hosted Tinker: what can be tested without reaching it.

Tests cannot reach the Tinker service. The SDK's own `ServiceClient` is built and pointed at
nothing (its construction makes no request), the engine's datums go through the SDK's own wire
encoder, and every call the engine makes on the local service is bound against the installed
SDK's method signatures, so an SDK change breaks a test. Where a call would need Tinker's
servers, a named fake of the hosted service stands in for exactly that call (`HostedTinkerFake`
for a sampling session; a recorder for `create_lora_training_client`), and binds each call to
the SDK's real signature.
"""

from __future__ import annotations

import asyncio
import inspect
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tinker
from huggingface_hub import constants as hf_constants
from tinker import types
from tinker.lib.public_interfaces.backcompat_sampling_client_future import (
    BackcompatSamplingClientFuture,
)
from tinker.proto import tinker_public_pb2 as public_pb
from tinker.proto.request_conv import forward_backward_request_to_proto

from claas.adapters import Adapters, AdapterSpec
from claas.errors import InvalidRequest, ModelNotFound
from claas.feedback import train_and_register
from claas.models import convert_embedded, load_tokenizer, tiny_llama
from claas.runtime import Runtime
from claas.sdpo import datums
from claas.sdpo.engine import FeedbackSample, SDPOEngine, TrainingConfig
from claas.sdpo.prompts import chat_prompt_tokens
from claas.services import local
from claas.services.protocol import HOSTED_TINKER, capabilities_of
from claas.services.tinker import base_model_tokenizer, build_service_client, tinker_api_key
from claas.settings import EMBEDDED_MODEL, Settings
from claas.store import Store

SDK_CLASS = {
    local.LocalServiceClient: tinker.ServiceClient,
    local.LocalTrainingClient: tinker.TrainingClient,
    local.LocalSamplingClient: tinker.SamplingClient,
    local.LocalRestClient: tinker.RestClient,
}


def test_service_client_is_built_from_config() -> None:
    client = build_service_client(environ={"TINKER_API_KEY": "tml-test"})
    assert isinstance(client, tinker.ServiceClient)
    assert tinker_api_key({"CLAAS_TINKER_API_KEY": "a", "TINKER_API_KEY": "b"}) == "a"
    with pytest.raises(InvalidRequest, match="CLAAS_TINKER_API_KEY or TINKER_API_KEY"):
        build_service_client(environ={})


def _decoded_dtypes(datum: types.Datum) -> dict[str, tuple[int, list[int]]]:
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn="cross_entropy"),
        model_id="model-1",
        seq_id=1,
    )
    wire = forward_backward_request_to_proto(request)
    decoded = public_pb.ForwardBackwardRequest.FromString(wire.SerializeToString())
    return {
        name: (tensor.dtype, list(tensor.shape))
        for name, tensor in decoded.data[0].loss_fn_inputs.items()
    }


def test_engine_datums_encode_with_tinkers_dtypes() -> None:
    prompt, response = [1, 5, 9, 4], [7, 8, 2]
    teacher = np.array([[3, 4], [5, 6], [2, 9]], dtype=np.int64)
    weights = np.full((3, 2), 0.1)
    topk = datums.topk_datum(prompt, response, teacher, weights, np.zeros(3))
    fields = _decoded_dtypes(topk)
    int64, float32 = public_pb.DTYPE_INT64, public_pb.DTYPE_FLOAT32
    assert fields == {"target_tokens": (int64, [6, 3]), "weights": (float32, [6, 3])}
    assert topk.model_input.to_ints() == (prompt + response)[:-1]

    targets = datums.sampled_targets(prompt, response)
    scalar = datums.cross_entropy_datum(prompt + response, targets)
    assert _decoded_dtypes(scalar) == {"target_tokens": (int64, [6]), "weights": (float32, [6])}


class CallRecorder:
    """Records every call the engine makes on the local service's classes (a spy; the calls
    run for real)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[type, str, tuple[Any, ...], dict[str, Any]]] = []
        self.recording = True
        for cls in SDK_CLASS:
            for name, member in vars(cls).items():
                if callable(member) and not name.startswith("_") and name != "lora_parameters":
                    monkeypatch.setattr(cls, name, self._wrap(cls, name, member))

    def _wrap(self, cls: type, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(instance: Any, *args: Any, **kwargs: Any) -> Any:
            if self.recording:
                self.calls.append((cls, name, args, kwargs))
            return method(instance, *args, **kwargs)

        return recorded


@pytest.mark.parametrize("topk", [True, False])
def test_engine_calls_match_the_sdk_signatures(
    model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, topk: bool
) -> None:
    loaded = tiny_llama(model_cache, seed=0)
    service = local.LocalServiceClient(loaded, tmp_path / "checkpoints")
    store = Store(tmp_path / "claas.db")
    try:
        asyncio.run(Adapters(service, store, loaded.name).init("a/b", AdapterSpec(rank=2)))
        messages = [{"role": "user", "content": "hello"}]
        prompt = chat_prompt_tokens(loaded.tokenizer, messages)
        sample = FeedbackSample(
            lora_id="a/b",
            messages=messages,
            prompt_tokens=prompt,
            response_tokens=[10, 11, 2],
            behavior_logprobs=[-10.0, -10.0, -10.0],
            feedback="shorter",
        )
        recorder = CallRecorder(monkeypatch)
        engine = SDPOEngine(service, loaded.name, loaded.max_context)
        config = TrainingConfig(
            use_topk_divergence=topk, steps_per_batch=2, teacher_top_k=3, kl_reg_weight=0.1
        )
        asyncio.run(train_and_register(engine, store, [sample], config))
        recorder.recording = False  # only the engine's own calls; not the test's clean-up
    finally:
        service.close()
        store.close()

    used = {(cls, name) for cls, name, _, _ in recorder.calls}
    training = [name for cls, name, _, _ in recorder.calls if cls is local.LocalTrainingClient]
    # Each step scores the student inside its own pass: no scoring pass of its own, no sampler
    # on the training weights; one forward scores the student after the last step.
    assert training.count("forward_backward_custom") == config.steps_per_batch
    assert training.count("forward") == 1
    assert "forward_backward" not in training
    assert "save_weights_and_get_sampling_client" not in training
    assert (local.LocalSamplingClient, "sample" if topk else "compute_logprobs") in used
    for cls, name, args, kwargs in recorder.calls:
        sdk_method = getattr(SDK_CLASS[cls], name, None)
        assert sdk_method is not None, f"{SDK_CLASS[cls].__name__} has no method {name}"
        inspect.signature(sdk_method).bind(None, *args, **kwargs)  # raises on a mismatch


def test_adapter_init_arguments_bind_to_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a real ServiceClient, init passes only Tinker's own LoRA arguments.

    The client's `create_lora_training_client` is replaced by a recorder (a fake: the hosted
    service cannot run here) that binds each call to the SDK's real signature."""
    client = build_service_client(environ={"TINKER_API_KEY": "tml-test"})
    assert capabilities_of(client) == HOSTED_TINKER
    signature = inspect.signature(tinker.ServiceClient.create_lora_training_client)
    calls: list[inspect.BoundArguments] = []

    def record(*args: Any, **kwargs: Any) -> None:
        calls.append(signature.bind(client, *args, **kwargs))  # raises on a mismatch

    monkeypatch.setattr(client, "create_lora_training_client", record)
    adapters = Adapters(client, store=None, base_model="Qwen/Qwen3-8B")  # type: ignore[arg-type]
    attention = AdapterSpec(rank=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    adapters._create_training_client("Qwen/Qwen3-8B", attention)
    (call,) = calls
    assert call.arguments["rank"] == 8
    assert call.arguments["train_attn"] and not call.arguments["train_mlp"]
    assert not call.arguments["train_unembed"]
    with pytest.raises(InvalidRequest, match="whole groups"):
        adapters._create_training_client("Qwen/Qwen3-8B", AdapterSpec(target_modules=["q_proj"]))


# The base model's tokenizer on --service tinker: local first, else the SDK's get_tokenizer().

CACHED_REPO = "claas-test/smol-tokenizer"  # a repo id put in a temporary Hugging Face cache
TINKER_VARIANT = f"{CACHED_REPO}/tinker-variant"  # Tinker's "<org>/<model>/<variant>" naming


class HostedTinkerFake:
    """A fake of the hosted Tinker service, and only of it: Tinker's servers cannot run here.

    It answers `ServiceClient.create_sampling_client`, each call bound to the SDK's real
    signature, with a future of a sampling client whose `get_tokenizer` is the installed SDK's
    own `SamplingClient.get_tokenizer`: the faked part is the session that Tinker's servers would
    open, while the code that maps the model name to a tokenizer and loads it is the SDK's.
    `refuse` makes the session fail instead, as Tinker does for a bad key or an unknown model.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, refuse: Exception | None = None) -> None:
        self.base_models: list[str | None] = []
        self.refuse = refuse
        signature = inspect.signature(tinker.ServiceClient.create_sampling_client)

        def create_sampling_client(client: Any, *args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(client, *args, **kwargs)  # raises on a mismatch
            self.base_models.append(bound.arguments.get("base_model"))
            if self.refuse is not None:
                raise self.refuse
            return _ReadyFuture(_SdkSamplingClient(bound.arguments["base_model"]))

        monkeypatch.setattr(tinker.ServiceClient, "create_sampling_client", create_sampling_client)


class _SdkSamplingClient:
    """The state the SDK's `SamplingClient.get_tokenizer` reads, with that very method."""

    get_tokenizer = tinker.SamplingClient.get_tokenizer

    def __init__(self, base_model: str) -> None:
        self._base_model = base_model


class _ReadyFuture:
    def __init__(self, client: _SdkSamplingClient) -> None:
        self.client = client

    def result(self, *args: Any, **kwargs: Any) -> _SdkSamplingClient:
        inspect.signature(BackcompatSamplingClientFuture.result).bind(self, *args, **kwargs)
        return self.client


@pytest.fixture
def hf_cache(tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face cache holding CACHED_REPO as `hf download --exclude <weights>` leaves it:
    the embedded SmolLM2's tokenizer and config files, no weights. Offline mode is on."""
    cache = tmp_path / "hf-cache"
    repo = cache / f"models--{CACHED_REPO.replace('/', '--')}"
    revision = "0" * 40
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for file in convert_embedded(model_cache).iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


def _same_tokenizer(tokenizer: Any, model_cache: Path) -> bool:
    embedded = load_tokenizer(EMBEDDED_MODEL, model_cache)
    text = "Why is the sky blue?"
    return bool(
        tokenizer.encode(text) == embedded.encode(text)
        and tokenizer.chat_template == embedded.chat_template
    )


def test_tokenizer_in_the_local_cache_asks_no_service(
    hf_cache: Path, tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hosted = HostedTinkerFake(monkeypatch)
    client = build_service_client(environ={"TINKER_API_KEY": "tml-test"})
    tokenizer = base_model_tokenizer(client, CACHED_REPO, tmp_path / "models")
    assert _same_tokenizer(tokenizer, model_cache)
    assert hosted.base_models == []


def test_tokenizer_not_found_locally_comes_from_the_sdk(
    hf_cache: Path, tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Tinker name no local lookup resolves: the SDK maps it to its tokenizer's repo."""
    with pytest.raises(ModelNotFound):
        load_tokenizer(TINKER_VARIANT, tmp_path / "models")
    hosted = HostedTinkerFake(monkeypatch)
    client = build_service_client(environ={"TINKER_API_KEY": "tml-test"})
    tokenizer = base_model_tokenizer(client, TINKER_VARIANT, tmp_path / "models")
    assert _same_tokenizer(tokenizer, model_cache)
    assert hosted.base_models == [TINKER_VARIANT]


def test_no_tokenizer_anywhere_says_what_to_do_offline(
    hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hosted = HostedTinkerFake(monkeypatch)
    client = build_service_client(environ={"TINKER_API_KEY": "tml-test"})
    with pytest.raises(ModelNotFound) as caught:
        base_model_tokenizer(client, "claas-test/absent", tmp_path / "models")
    message = str(caught.value)
    assert hosted.base_models == ["claas-test/absent"]
    assert "'claas-test/absent'" in message and str(hf_cache) in message
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in message and "HF_HUB_OFFLINE=0" in message
    assert "`hf download claas-test/absent --exclude '*.safetensors' '*.bin'" in message
    assert "OSError" in message  # the SDK's own failure, named


def test_no_tokenizer_when_tinker_refuses_says_what_to_do(
    hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    refusal = RuntimeError("HostedTinkerFake: this key may not sample claas-test/absent")
    hosted = HostedTinkerFake(monkeypatch, refuse=refusal)
    client = build_service_client(environ={"TINKER_API_KEY": "tml-test"})
    with pytest.raises(ModelNotFound) as caught:
        base_model_tokenizer(client, "claas-test/absent", tmp_path / "models")
    message = str(caught.value)
    assert caught.value.__cause__ is refusal and hosted.base_models == ["claas-test/absent"]
    assert "RuntimeError: HostedTinkerFake: this key may not sample" in message
    assert "CLAAS_TINKER_API_KEY / TINKER_API_KEY" in message and "HF_TOKEN" in message
    assert "offline mode is on" not in message
    assert "`hf download claas-test/absent --exclude" in message


def test_runtime_on_tinker_serves_with_the_sdks_tokenizer(
    hf_cache: Path, tmp_path: Path, model_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TINKER_API_KEY", "tml-test")
    hosted = HostedTinkerFake(monkeypatch)
    settings = Settings(service="tinker", tinker_base_model=TINKER_VARIANT, data_dir=tmp_path)
    runtime = Runtime.build(settings)
    try:
        assert isinstance(runtime.service, tinker.ServiceClient)
        assert runtime.base_model == TINKER_VARIANT
        assert _same_tokenizer(runtime.tokenizer, model_cache)
        assert hosted.base_models == [TINKER_VARIANT]
    finally:
        runtime.close()
