"""What the commands that talk to a running server share: the options that name it, the client,
argparse types that refuse a bad value before anything is sent, and JSON output.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from claas.client import Client
from claas.errors import InvalidLoraId
from claas.ids import parse_lora_id


def remote_options() -> argparse.ArgumentParser:
    """The options of every remote command: --url, --api-key, --timeout."""
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument(
        "--url", help="the claas server (default: $CLAAS_URL, else http://127.0.0.1:8000)"
    )
    remote.add_argument("--api-key", help="API key (default: $CLAAS_API_KEY)")
    remote.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds to wait for an answer, and for training (at most 3600) [default: 600]",
    )
    return remote


def remote_client(args: argparse.Namespace) -> Client:
    """A client for the server named by --url/--api-key, else $CLAAS_URL/$CLAAS_API_KEY."""
    return Client(args.url, args.api_key, args.timeout)


def print_json(value: Any) -> int:
    print(json.dumps(value, indent=2))
    return 0


def lora_id(text: str) -> str:
    """An argparse type: `owner/name`, refused before anything is sent."""
    try:
        parse_lora_id(text)
    except InvalidLoraId as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def json_object(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object, such as a training config override."""
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"give a JSON object, e.g. '{{\"steps_per_batch\": 1}}'; got {text!r}"
        )
    return value
