"""Hosted Tinker: the distributed training service, once a user outgrows one machine.

The SDPO engine takes a real `tinker.ServiceClient` exactly as it takes the local service. This
module only builds one from claas settings; the SDK does the rest. Construction is lazy (no
network until the first call), so it is safe at start-up.

    service = build_service_client()          # reads CLAAS_TINKER_API_KEY or TINKER_API_KEY
    tokenizer = base_model_tokenizer(service, "Qwen/Qwen3-8B", cache_root)
    engine = SDPOEngine(service, store, base_model="Qwen/Qwen3-8B", max_context=32768)

The base model's tokenizer is looked up locally first (a directory, or the local Hugging Face
cache); only if it is not there does `base_model_tokenizer` ask the SDK, whose `get_tokenizer()`
loads it with transformers' `AutoTokenizer` under the Hugging Face id Tinker uses for that model.
That reads the local Hugging Face cache and, unless offline mode is on (`HF_HUB_OFFLINE=1`),
downloads the tokenizer's files (never the weights) into it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import tinker
from huggingface_hub import constants as hf_constants
from transformers import PreTrainedTokenizerBase

from claas.errors import InvalidRequest, ModelNotFound
from claas.models import load_tokenizer

API_KEY_VARIABLES = ("CLAAS_TINKER_API_KEY", "TINKER_API_KEY")
# Creating a sampling session answers in about a second; past this, Tinker is not answering.
SAMPLING_CLIENT_TIMEOUT = 120.0
# Every file of a model repository except its weights: what `hf download` needs to fetch a
# tokenizer (and the config claas reads the model's size from) without the weights.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")

logger = logging.getLogger(__name__)


def tinker_api_key(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    for name in API_KEY_VARIABLES:
        if environ.get(name):
            return environ[name]
    raise InvalidRequest(
        "the tinker service needs an API key: set CLAAS_TINKER_API_KEY or TINKER_API_KEY "
        "(from the Tinker console), or run with --service local"
    )


def build_service_client(
    api_key: str | None = None,
    base_url: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> tinker.ServiceClient:
    """A real `tinker.ServiceClient` for the engine."""
    return tinker.ServiceClient(
        api_key=api_key or tinker_api_key(environ),
        base_url=base_url,
        display_name="claas",
    )


def base_model_tokenizer(
    service: tinker.ServiceClient,
    base_model: str,
    cache_root: Path,
    timeout: float = SAMPLING_CLIENT_TIMEOUT,
) -> PreTrainedTokenizerBase:
    """The tokenizer of a hosted base model: local if it is here, else the Tinker SDK's.

    Local (a directory, or the local Hugging Face cache) needs no request. Otherwise a sampling
    client on the base model is created and its `get_tokenizer()` called; see the module
    docstring for what that reads and may download. Neither: `ModelNotFound` says what to do.
    """
    try:
        return load_tokenizer(base_model, cache_root)
    except (ModelNotFound, OSError, ValueError):
        pass  # not here; the SDK knows the tokenizer's id for this Tinker model
    offline = hf_constants.is_offline_mode()
    logger.warning(
        "the tokenizer of %s is not in the local Hugging Face cache (%s); asking the Tinker SDK "
        "for it%s",
        base_model,
        hf_constants.HF_HUB_CACHE,
        ""
        if offline
        else ", which may download its tokenizer files (not the weights) from Hugging Face",
    )
    try:
        sampler = service.create_sampling_client(base_model=base_model).result(timeout=timeout)
        tokenizer: PreTrainedTokenizerBase = sampler.get_tokenizer()
    except Exception as error:  # Tinker's, the network's or Hugging Face's: each means "not had"
        raise ModelNotFound(no_tokenizer_message(base_model, error, offline)) from error
    return tokenizer


def no_tokenizer_message(base_model: str, error: BaseException, offline: bool) -> str:
    """What went wrong looking for a hosted model's tokenizer, and the ways to fix it."""
    exclude = " ".join(f"'{pattern}'" for pattern in WEIGHT_PATTERNS)
    fetch = f"`hf download {base_model} --exclude {exclude}`"
    if offline:
        sdk = (
            "Hugging Face offline mode is on (HF_HUB_OFFLINE=1), so the SDK may only read that "
            "cache; set HF_HUB_OFFLINE=0 to let it download the tokenizer's files (not the "
            "weights) from Hugging Face"
        )
    else:
        sdk = (
            "Hugging Face offline mode is off, so the SDK may have tried to download it: if "
            "the error is Hugging Face's, check this machine's access to it (and HF_TOKEN for "
            "a gated model)"
        )
    return (
        f"no tokenizer for the Tinker base model {base_model!r}: it is neither a local directory "
        f"nor in the local Hugging Face cache ({hf_constants.HF_HUB_CACHE}), and the Tinker "
        f"SDK's get_tokenizer() failed ({type(error).__name__}: {error}). If that names the API "
        "key or the model, check CLAAS_TINKER_API_KEY / TINKER_API_KEY and "
        f"CLAAS_TINKER_BASE_MODEL. {sdk}. Or fetch the tokenizer into the cache once, without "
        f"the weights: {fetch}"
    )
