"""The `claas` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from claas.errors import ClaasError
from claas.settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by whichever flags were given."""
    names = ("model", "data_dir", "device", "host", "port", "service", "inference", "vllm_url")
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in names if getattr(args, name, None) is not None
    }
    if getattr(args, "insecure", False):
        overrides["insecure"] = True
    return Settings(**overrides)


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream one chat reply from the base model to the terminal."""
    import torch
    from transformers import TextStreamer

    from claas.models import load_model
    from claas.sdpo.prompts import chat_prompt_tokens

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


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the API server on the configured model and training service."""
    import ipaddress

    import uvicorn

    from claas.api.app import create_app
    from claas.runtime import Runtime

    settings = _settings(args)
    keyless = not settings.api_keys and not settings.admin_key
    try:
        loopback = settings.host == "localhost" or ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        loopback = False
    if keyless and not loopback:
        if not settings.insecure:
            print(
                f"claas: error: refusing to bind {settings.host} without API keys. Set "
                "CLAAS_API_KEYS (and CLAAS_ADMIN_KEY), bind 127.0.0.1, or pass --insecure",
                file=sys.stderr,
            )
            return 2
        print(
            f"claas: WARNING: serving on {settings.host} with no API keys: anyone who can "
            "reach this port can read and train every adapter",
            file=sys.stderr,
        )
    runtime = Runtime.build(settings)
    app = create_app(runtime)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning")
    server = _announcing_server(config, runtime.base_model, settings.service)
    try:
        server.run()
    finally:
        runtime.close()
    return 0 if server.started else 1


def _announcing_server(config: Any, model: str, service: str) -> Any:
    """uvicorn's server, printing the address it really bound (`--port 0` picks one) once bound."""
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if not self.started:  # the bind failed; uvicorn has said why
                return
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
            print(f"claas serving {model} ({service}) at {url}  (docs: {url}/docs)")
            print(
                f"try: curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' "
                f'-d \'{{"model": "{model}", "temperature": 0, "messages": '
                '[{"role": "user", "content": "Hello!"}]}\'',
                flush=True,
            )

    return AnnouncingServer(config)


def _client(args: argparse.Namespace) -> Any:
    import httpx

    key = args.api_key or os.environ.get("CLAAS_API_KEY")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=args.url, headers=headers, timeout=args.timeout)


def _show(response: Any) -> int:
    """Print a server response; errors go to stderr with the server's message."""
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        print(f"claas: error {response.status_code}: {message}", file=sys.stderr)
        return 1
    print(json.dumps(response.json(), indent=2))
    return 0


def cmd_adapters(args: argparse.Namespace) -> int:
    """Adapter lifecycle against a running server."""
    with _client(args) as client:
        if args.action == "create":
            body: dict[str, Any] = {"lora_id": args.lora_id, "rank": args.rank}
            if args.lora_alpha is not None:
                body["lora_alpha"] = args.lora_alpha
            if args.target_modules:
                body["target_modules"] = args.target_modules.split(",")
            return _show(client.post("/v1/adapters", json=body))
        if args.action == "list":
            return _show(client.get("/v1/adapters", params={"prefix": args.prefix}))
        path = f"/v1/adapters/{args.lora_id}"
        if args.action == "versions":
            return _show(client.get(path))
        if args.action == "rollback":
            return _show(client.post(f"{path}/rollback", json={"version": args.version}))
        if args.action == "delete":
            return _show(client.delete(path))
        params = {"version": args.version} if args.version else {}
        response = client.get(f"{path}/export", params=params)
        if response.status_code >= 400:
            return _show(response)
        out = Path(args.output or f"{args.lora_id.replace('/', '-')}.zip")
        out.write_bytes(response.content)
        print(f"wrote {out} ({len(response.content)} bytes, PEFT format)")
        return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _show(client.get(f"/v1/feedback/{args.feedback_id}"))


def cmd_eval(args: argparse.Namespace) -> int:
    """An automated feedback loop against a server (or an in-process one); or compare two runs."""
    from claas.eval.command import eval_command

    return eval_command(args, _settings(args))


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

    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="run the OpenAI-compatible API",
        description=_settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--service", choices=["local", "tinker"], help="training service")
    serve.add_argument(
        "--inference", choices=["local", "vllm"], help="who samples chat (default local)"
    )
    serve.add_argument("--vllm-url", help="the vLLM server, with --inference vllm")
    serve.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback bind without API keys"
    )
    serve.set_defaults(handler=cmd_serve)

    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--url", default="http://127.0.0.1:8000", help="the claas server")
    remote.add_argument("--api-key", help="API key (default: $CLAAS_API_KEY)")
    remote.add_argument("--timeout", type=float, default=600.0)
    adapters = sub.add_parser("adapters", help="manage adapters on a running server")
    actions = adapters.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", parents=[remote], help="create owner/name")
    create.add_argument("lora_id")
    create.add_argument("--rank", type=int, default=32)
    create.add_argument("--lora-alpha", type=float)
    create.add_argument("--target-modules", help="comma-separated, e.g. q_proj,v_proj")
    listing = actions.add_parser("list", parents=[remote], help="list adapters")
    listing.add_argument("--prefix", default="")
    for name, text in [("versions", "an adapter and its versions"), ("delete", "delete all")]:
        action = actions.add_parser(name, parents=[remote], help=text)
        action.add_argument("lora_id")
    rollback = actions.add_parser("rollback", parents=[remote], help="serve version N again")
    rollback.add_argument("lora_id")
    rollback.add_argument("version", type=int)
    export = actions.add_parser("export", parents=[remote], help="download a PEFT zip")
    export.add_argument("lora_id")
    export.add_argument("--version", type=int)
    export.add_argument("--output", "-o")
    adapters.set_defaults(handler=cmd_adapters)

    feedback = sub.add_parser("feedback", help="feedback requests on a running server")
    feedback_actions = feedback.add_subparsers(dest="action", required=True)
    status = feedback_actions.add_parser("status", parents=[remote], help="status and metrics")
    status.add_argument("feedback_id")
    feedback.set_defaults(handler=cmd_feedback)

    from claas.eval.command import add_arguments as add_eval_arguments

    evaluate = sub.add_parser(
        "eval",
        parents=[common],
        help="teach preferences by feedback and measure them; `eval compare A B` compares runs",
        description="claas eval [options] [KEY=VALUE ...]  |  claas eval compare RUN_A RUN_B",
    )
    add_eval_arguments(evaluate)
    evaluate.set_defaults(handler=cmd_eval)
    return parser


def _settings_help() -> str:
    """Every setting, its environment variable and meaning, for `claas serve --help`."""
    lines = ["Settings (environment variables, or a YAML file named by CLAAS_CONFIG):", ""]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        lines.append(f"  CLAAS_{name.upper():24s} {field.description or ''} [default: {default}]")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import httpx

    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ClaasError as error:
        print(f"claas: error: {error}", file=sys.stderr)
        return 2
    except httpx.HTTPError as error:
        print(
            f"claas: error: cannot reach the server at {getattr(args, 'url', '?')} ({error}); "
            "start it with `claas serve` or pass --url",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
