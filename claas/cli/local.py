"""The commands that run claas in this process: `generate`, `serve` and `worker`.

They read the one settings class (`claas.settings.Settings`: the environment, or a YAML file
named by CLAAS_CONFIG), overridden by the flags given (`settings_from`). Their heavy imports
(torch, uvicorn, the runtime) happen inside the commands, so the remote commands start fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from claas.settings import Settings


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by whichever flags were given."""
    names = (
        "model",
        "data_dir",
        "device",
        "host",
        "port",
        "service",
        "inference",
        "vllm_url",
        "log_level",
        "database_url",
    )
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in names if getattr(args, name, None) is not None
    }
    if getattr(args, "insecure", False):
        overrides["insecure"] = True
    if getattr(args, "no_train", False):
        overrides["train"] = False
    return Settings(**overrides)


def settings_help() -> str:
    """Every setting, its environment variable and meaning, for `claas serve --help`."""
    lines = ["Settings (environment variables, or a YAML file named by CLAAS_CONFIG):", ""]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        lines.append(f"  CLAAS_{name.upper():24s} {field.description or ''} [default: {default}]")
    return "\n".join(lines)


def add_local_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """`generate`, `serve` and `worker`, with the options every local command shares."""
    generate = sub.add_parser("generate", parents=[common], help="stream a reply from the model")
    generate.add_argument("prompt", help="the user message")
    generate.add_argument("--max-tokens", type=int, default=256)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.set_defaults(handler=cmd_generate)

    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="run the OpenAI-compatible API",
        description=settings_help(),
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
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="level of the JSON log lines on stderr (default info)",
    )
    serve.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback bind without API keys"
    )
    serve.add_argument(
        "--no-train",
        action="store_true",
        help="an API replica: queue feedback for `claas worker` processes, train nothing here",
    )
    serve.add_argument(
        "--database-url",
        help="the shared database, e.g. postgresql+psycopg://claas@db/claas "
        "(default: the SQLite file in the data dir)",
    )
    serve.set_defaults(handler=cmd_serve)

    worker = sub.add_parser(
        "worker",
        parents=[common],
        help="train feedback queued by API replicas (`serve --no-train`) in a shared database",
        description="Claims queued feedback from the database (CLAAS_DATABASE_URL), trains it "
        "on this machine's service and registers each new version under the shared "
        "checkpoint root (CLAAS_CHECKPOINT_DIR). Any number of workers may run: each "
        "adapter's requests still train one batch at a time, in arrival order. Stops on "
        "SIGTERM or SIGINT; a batch it was training is trained again by another worker once "
        "its lease (CLAAS_LEASE_SECONDS) ends.\n\n" + settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    worker.add_argument("--service", choices=["local", "tinker"], help="training service")
    worker.add_argument(
        "--database-url", help="the shared database (default: the SQLite file in the data dir)"
    )
    worker.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="level of the JSON log lines on stderr (default info)",
    )
    worker.set_defaults(handler=cmd_worker)


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream one chat reply from the base model to the terminal."""
    import torch
    from transformers import TextStreamer

    from claas.models import load_model
    from claas.sdpo.prompts import chat_prompt_tokens

    settings = settings_from(args)
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

    from claas.logs import configure_logging, uvicorn_logging

    settings = settings_from(args)
    configure_logging(settings.log_level)  # before the runtime, so its warnings are JSON too
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
    _check_local_model(settings)
    # Imported only now: a refusal above is told at once, not after seconds of torch imports.
    import uvicorn

    from claas.api.app import create_app
    from claas.runtime import Runtime

    runtime = Runtime.build(settings)
    app = create_app(runtime)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, **uvicorn_logging(settings.log_level)
    )
    server = _announcing_server(config, runtime.base_model, settings.service)
    try:
        server.run()
    finally:
        runtime.close()
    return 0 if server.started else 1


def cmd_worker(args: argparse.Namespace) -> int:
    """Train feedback queued in the shared database, until SIGTERM or SIGINT."""
    import asyncio
    import signal

    from claas.logs import configure_logging

    settings = settings_from(args).model_copy(update={"train": True})
    configure_logging(settings.log_level)
    _check_local_model(settings)
    from claas.runtime import Runtime  # after the check: seconds of torch imports

    runtime = Runtime.build(settings)

    async def work() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        runtime.queue.start()
        print(
            f"claas worker {runtime.queue.worker} training {runtime.base_model} "
            f"({settings.service}) from {runtime.store.where}",
            flush=True,
        )
        await stop.wait()
        await runtime.queue.stop()

    try:
        asyncio.run(work())
    finally:
        runtime.close()
    return 0


def _check_local_model(settings: Settings) -> None:
    """A local service's model must be on this machine: say so before the runtime's imports.
    (Tinker's base models are hosted; the Tinker service finds their tokenizers itself.)"""
    if settings.service == "local":
        from claas.model_files import check_model

        check_model(settings.model)


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
