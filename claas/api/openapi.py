"""The served OpenAPI schema: what the pydantic models say, plus what only the running server knows.

The models document every bound that is fixed in code. The operator's caps are settings, so they
are written into the schema here, when it is first served: `max_tokens` and
`max_completion_tokens` up to `CLAAS_MAX_TOKENS_CAP`, `n` up to `CLAAS_MAX_SAMPLES`, `messages`
up to `CLAAS_MAX_MESSAGES`, a LoRA rank up to `CLAAS_MAX_LORA_RANK`, the base models adapters
may be created on, and `logit_bias` keys to the tokenizer's ids. A request the schema
admits is then one the server takes, except for what no schema can say (a prompt longer than
the model's context, an adapter that does not exist).

Streamed answers are documented event by event (`stream_events`): each event's `data` is a chunk
of its route (`ChatCompletionChunk`, `TextCompletionChunk`), an error (`ErrorEnvelope`, when a
stream fails after its 200 was sent), or the closing `[DONE]`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from claas.api.errors import ErrorEnvelope
from claas.api.openai_responses import ChatCompletionChunk, TextCompletionChunk
from claas.runtime import Runtime

STREAMS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionChunk,
    "/v1/completions": TextCompletionChunk,
}


def document_limits(app: FastAPI, runtime: Runtime) -> None:
    """Serve `app`'s schema with what this runtime allows written in."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            _write_caps(schema["components"]["schemas"], runtime)
            _document_streams(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _write_caps(models: dict[str, Any], runtime: Runtime) -> None:
    settings = runtime.settings
    caps = [
        ("max_tokens", settings.max_tokens_cap),
        ("max_completion_tokens", settings.max_tokens_cap),
        ("n", settings.max_samples),
    ]
    _bound(models["ChatCompletionRequest"], "messages", "maxItems", settings.max_messages)
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        for field, value in caps:
            _bound(models[name], field, "maximum", value)
        bias = models[name]["properties"]["logit_bias"]["anyOf"][0]
        bias["propertyNames"]["pattern"] = decimal_below(len(runtime.tokenizer))
    bases = runtime.adapters.allowed_base_models
    for name, rank in (("AdapterCreate", "rank"), ("ClaasLoraInit", "lora_r")):
        _bound(models[name], rank, "maximum", settings.max_lora_rank)
        base_model = models[name]["properties"]["base_model"]
        base_model["anyOf"] = [{"enum": bases}, {"type": "null"}]
        base_model["description"] = "Default: the served model. Allowed: CLAAS_ALLOWED_BASE_MODELS."


def _bound(model: dict[str, Any], field: str, keyword: str, value: int) -> None:
    """Set `keyword` on the field's schema (on its non-null branch, for an optional field),
    never loosening what the model already says."""
    schema = model["properties"][field]
    branches = [b for b in schema.get("anyOf", [schema]) if b.get("type") != "null"]
    for branch in branches:
        branch[keyword] = min(value, branch.get(keyword, value))


def _document_streams(schema: dict[str, Any]) -> None:
    models: list[type[BaseModel]] = [*STREAMS.values(), ErrorEnvelope]
    _, definitions = models_json_schema(
        [(model, "serialization") for model in models],
        ref_template="#/components/schemas/{model}",
    )
    components = schema["components"]["schemas"]
    for name, definition in definitions["$defs"].items():
        components.setdefault(name, definition)
    for path, chunk in STREAMS.items():
        content = schema["paths"][path]["post"]["responses"]["200"]["content"]
        content["text/event-stream"] = {"schema": stream_event(chunk.__name__)}


def stream_event(chunk: str) -> dict[str, Any]:
    """One server-sent event (as OpenAPI 3.1 documents an event stream, event by event): its
    `data` is `[DONE]`, or JSON that is a chunk named `chunk` or an error."""
    ref = "#/components/schemas/{}".format
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "string",
                "if": {"const": "[DONE]"},
                "else": {
                    "contentMediaType": "application/json",
                    "contentSchema": {
                        "anyOf": [{"$ref": ref(chunk)}, {"$ref": ref(ErrorEnvelope.__name__)}]
                    },
                },
            }
        },
    }


def decimal_below(n: int) -> str:
    """A regex of the decimal numbers 0 .. n-1 (leading zeros allowed), for a JSON Schema
    `pattern`: 0, or after any zeros a number that has fewer digits than n, or as many and
    agrees with n up to a digit where it is smaller."""
    if n < 1:
        raise ValueError(f"no number is below {n}")
    digits = str(n)
    positive = [f"[1-9][0-9]{{0,{len(digits) - 2}}}"] if len(digits) > 1 else []
    for at, digit in enumerate(digits):
        low = 1 if at == 0 else 0  # no leading 0: that number has fewer digits
        if int(digit) <= low:
            continue
        smaller = str(low) if int(digit) - 1 == low else f"[{low}-{int(digit) - 1}]"
        rest = len(digits) - at - 1
        positive.append(digits[:at] + smaller + (f"[0-9]{{{rest}}}" if rest else ""))
    return f"^0*(?:0|{'|'.join(positive)})$" if positive else "^0+$"
