"""The `claas` command line: `build_parser` assembles the commands, `main` runs one and turns
its errors into a message and an exit code.

One module per command group:
- `claas.cli.local`: `generate`, `serve` and `worker`, which run claas in this process;
- `claas.cli.adapters`, `claas.cli.feedback` and `claas.cli.chat`: commands against a running
  server, through `claas.client` (`claas.cli.remote` holds what they share);
- `claas.cli.evaluate`: `eval`, the automated feedback loop of `claas.eval`.

    claas serve                      # or: python -m claas.cli serve
    claas adapters create alice/assistant
    claas chat alice/assistant
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import httpx

from claas.cli.adapters import add_adapters_command
from claas.cli.chat import add_chat_command
from claas.cli.evaluate import add_eval_command
from claas.cli.feedback import add_feedback_command
from claas.cli.local import add_local_commands
from claas.client import DEFAULT_URL, ClaasAPIError, FeedbackTimeout
from claas.errors import ClaasError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="claas", description="The `claas` command line.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="base model (default: embedded SmolLM2-135M-Instruct)")
    common.add_argument("--data-dir", type=Path, help="data dir (default ~/.local/share/claas)")
    common.add_argument("--device", choices=["auto", "cpu", "cuda"], help="torch device")
    sub = parser.add_subparsers(dest="command", required=True)
    add_local_commands(sub, common)
    add_adapters_command(sub)
    add_feedback_command(sub)
    add_chat_command(sub)
    add_eval_command(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ClaasAPIError as error:
        print(f"claas: error {error.status}: {error.message}", file=sys.stderr)
        return 1
    except FeedbackTimeout as error:
        print(
            f"claas: error: {error} (`claas feedback status {error.feedback.feedback_id}`)",
            file=sys.stderr,
        )
        return 1
    except ClaasError as error:
        print(f"claas: error: {error}", file=sys.stderr)
        return 2
    except httpx.HTTPError as error:
        print(
            f"claas: error: no answer from the server at "
            f"{getattr(args, 'url', None) or os.environ.get('CLAAS_URL', DEFAULT_URL)} "
            f"({type(error).__name__}: {error}); start it with `claas serve`, pass --url, or "
            "raise --timeout",
            file=sys.stderr,
        )
        return 2


__all__ = ["build_parser", "main"]
