"""The `claas` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from claas.errors import ClaasError
from claas.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        key: value
        for key, value in {
            "model": args.model,
            "data_dir": args.data_dir,
            "device": args.device,
        }.items()
        if value is not None
    }
    return Settings(**overrides)


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream one chat reply from the base model to the terminal."""
    import torch
    from transformers import TextStreamer

    from claas.models import load_model
    from claas.prompts import chat_prompt_tokens

    settings = _settings(args)
    loaded = load_model(settings.model, settings.model_cache_dir, settings.device)
    messages = [{"role": "user", "content": args.prompt}]
    prompt_ids = torch.tensor(
        [chat_prompt_tokens(loaded.tokenizer, messages)], device=loaded.device
    )
    streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    loaded.model.generate(
        prompt_ids,
        attention_mask=prompt_ids.new_ones(prompt_ids.shape),
        max_new_tokens=args.max_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else None,
        top_p=None,
        top_k=None,
        eos_token_id=loaded.stop_token_ids,
        pad_token_id=loaded.tokenizer.pad_token_id,
        streamer=streamer,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="claas", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="base model (default: embedded SmolLM2-135M-Instruct)")
    common.add_argument("--data-dir", type=Path, help="data dir (default ~/.local/share/claas)")
    common.add_argument("--device", choices=["auto", "cpu", "cuda"], help="torch device")
    sub = parser.add_subparsers(dest="command", required=True)

    generate = sub.add_parser("generate", parents=[common], help="stream a reply from the model")
    generate.add_argument("prompt", help="the user message")
    generate.add_argument("--max-tokens", type=int, default=256)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.set_defaults(handler=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ClaasError as error:
        print(f"claas: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
