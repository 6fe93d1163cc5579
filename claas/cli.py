"""The `claas` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from claas.client import (
    DEFAULT_URL,
    ClaasAPIError,
    Client,
    FeedbackItem,
    FeedbackTimeout,
    FeedbackView,
)
from claas.errors import ClaasError, InvalidLoraId
from claas.ids import parse_lora_id
from claas.settings import Settings

if TYPE_CHECKING:
    import openai
    from openai import OpenAI
    from openai.types.chat import ChatCompletionMessageParam


def _settings(args: argparse.Namespace) -> Settings:
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
    from claas.logs import configure_logging, uvicorn_logging
    from claas.runtime import Runtime

    settings = _settings(args)
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
    from claas.runtime import Runtime

    settings = _settings(args).model_copy(update={"train": True})
    configure_logging(settings.log_level)
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


def _remote(args: argparse.Namespace) -> Client:
    """A client for the server named by --url/--api-key, else $CLAAS_URL/$CLAAS_API_KEY."""
    return Client(args.url, args.api_key, args.timeout)


def _print_json(value: Any) -> int:
    print(json.dumps(value, indent=2))
    return 0


def _lora_id(text: str) -> str:
    """An argparse type: `owner/name`, refused before anything is sent."""
    try:
        parse_lora_id(text)
    except InvalidLoraId as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _json_object(text: str) -> dict[str, Any]:
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


def cmd_adapters(args: argparse.Namespace) -> int:
    """Adapter lifecycle against a running server."""
    with _remote(args) as claas:
        if args.action == "create":
            targets = args.target_modules.split(",") if args.target_modules else None
            created = claas.adapters.create(
                args.lora_id, rank=args.rank, lora_alpha=args.lora_alpha, target_modules=targets
            )
            return _print_json(created.model_dump(mode="json"))
        if args.action == "list":
            adapters = claas.adapters.list(args.prefix)
            return _print_json({"data": [a.model_dump(mode="json") for a in adapters]})
        if args.action == "versions":
            return _print_json(claas.adapters.get(args.lora_id).model_dump(mode="json"))
        if args.action == "rollback":
            rolled = claas.adapters.rollback(args.lora_id, args.version)
            return _print_json(rolled.model_dump(mode="json"))
        if args.action == "delete":
            return _print_json(claas.adapters.delete(args.lora_id).model_dump(mode="json"))
        if args.dir is not None:
            directory = claas.adapters.export(args.lora_id, args.dir, args.version)
            files = ", ".join(sorted(p.name for p in directory.iterdir()))
            print(f"unpacked {args.lora_id} into {directory} ({files}; PEFT format)")
            return 0
        archive = claas.adapters.archive(args.lora_id, args.version)
        out = Path(args.output or f"{args.lora_id.replace('/', '-')}.zip")
        out.write_bytes(archive)
        print(f"wrote {out} ({len(archive)} bytes, PEFT format)")
        return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    """Send feedback, read a request's status, or list an adapter's feedback log."""
    with _remote(args) as claas:
        if args.action == "status":
            return _print_json(claas.feedback.status(args.feedback_id).model_dump(mode="json"))
        if args.action == "log":
            log = claas.feedback.log(args.lora_id, args.limit, args.offset)
            return _print_log(args.lora_id, log)
        texts = [t for t in (args.adapter, args.prompt, args.response) if t is not None]
        if (args.completion_id is None) == (not texts) or 0 < len(texts) < 3:
            print(
                "claas feedback send: error: name the answer either with --completion-id, or "
                "with all of --adapter, --prompt and --response",
                file=sys.stderr,
            )
            return 2
        item = FeedbackItem(
            completion_id=args.completion_id,
            lora_id=args.adapter,
            prompt=args.prompt,
            response=args.response,
            feedback=args.feedback,
            training=args.training,
        )
        if not args.wait:
            return _print_json(claas.feedback.send(item).model_dump(mode="json"))
        return _print_trained(claas.feedback.send_and_wait(item, timeout=args.timeout))


def _print_trained(done: FeedbackView) -> int:
    """The outcome of a waited-for request: the new version and its metrics, or why it failed."""
    if done.status == "failed":
        print(f"claas: error: feedback {done.feedback_id} failed: {done.error}", file=sys.stderr)
        return 1
    print(f"feedback {done.feedback_id} done: {done.lora_id} is now at version {done.version}")
    # The per-step records and teacher texts are long; `claas feedback status` shows them.
    summary = {k: v for k, v in done.metrics.items() if k not in ("steps", "teacher_texts")}
    return _print_json(summary)


def _print_log(lora_id: str, log: list[FeedbackView]) -> int:
    """One line per request, newest first: id, status, version produced, time, feedback."""
    if not log:
        print(f"no feedback on {lora_id} yet")
    for request in log:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(request.created_at))
        version = f"v{request.version}" if request.version is not None else "-"
        text = " | ".join(str(item.get("feedback", "")) for item in request.items)
        print(f"{request.feedback_id}  {request.status:<7}  {version:<4}  {when}  {text}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """A terminal chat with a model; `/feedback TEXT` trains the adapter on the last answer."""
    with _remote(args) as claas, claas.openai() as chat:
        start: list[ChatCompletionMessageParam] = (
            [{"role": "system", "content": args.system}] if args.system else []
        )
        messages = list(start)
        last_id: str | None = None
        print(
            f"chatting with {args.model} at {claas.base_url}. /feedback TEXT trains it on the "
            "last answer, /reset starts over, /quit (or Ctrl-D) exits."
        )
        while True:
            try:
                line = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: done
                print()
                return 0
            command, _, rest = line.partition(" ")
            if not line:
                continue
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                messages, last_id = list(start), None
                print("(conversation cleared)")
            elif command == "/feedback":
                _chat_feedback(claas, last_id, rest.strip(), args.timeout)
            elif command.startswith("/"):
                print(f"unknown command {command}; use /feedback TEXT, /reset or /quit")
            else:
                messages.append({"role": "user", "content": line})
                answer = _stream_answer(chat, args, messages)
                if answer is None:  # the error is printed; the message is not kept
                    messages.pop()
                    continue
                last_id, text = answer
                messages.append({"role": "assistant", "content": text})


def _stream_answer(
    chat: OpenAI, args: argparse.Namespace, messages: list[ChatCompletionMessageParam]
) -> tuple[str, str] | None:
    """Stream one answer to stdout as it is sampled; its completion id and text (None: failed).

    Every chunk carries the completion id. The usage arrives in a last chunk without choices, so
    choices are iterated, never indexed. It is shown because the conversation grows with every
    turn, and feedback needs the whole of it, plus the feedback, to fit the model's context:
    the count says when to /reset.
    """
    import openai

    print(f"{args.model}> ", end="", flush=True)
    completion_id, pieces, usage = None, [], None
    try:
        stream = chat.chat.completions.create(
            model=args.model,
            messages=messages,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            completion_id = completion_id or chunk.id
            usage = chunk.usage or usage
            for choice in chunk.choices:
                if choice.index == 0 and choice.delta.content:
                    pieces.append(choice.delta.content)
                    print(choice.delta.content, end="", flush=True)
    except openai.APIError as error:
        print()
        print(f"claas: error{_openai_error(error)}", file=sys.stderr)
        return None
    print()
    if usage is not None:
        print(f"  [{usage.prompt_tokens} prompt + {usage.completion_tokens} answer tokens]")
    if completion_id is None:
        print("claas: error: the server sent an empty answer; try again", file=sys.stderr)
        return None
    return completion_id, "".join(pieces)


def _openai_error(error: openai.APIError) -> str:
    """The server's own words for an error the OpenAI client raised, as the other commands
    print them (`error 404: ...`)."""
    import openai

    if isinstance(error, openai.APIStatusError):
        body = error.body  # the `error` object of the server's answer
        message = body.get("message") if isinstance(body, dict) else None
        return f" {error.status_code}: {message or error.message}"
    if isinstance(error, openai.APIConnectionError):
        return f": cannot reach the server ({error.message}); check --url or $CLAAS_URL"
    return f": {error.message}"  # sent inside the stream, after it began


def _chat_feedback(claas: Client, completion_id: str | None, text: str, timeout: float) -> None:
    """Train on the last answer and wait, so the next answer comes from the new version."""
    if not text:
        print("say what to change: /feedback TEXT, e.g. /feedback shorter please")
        return
    if completion_id is None:
        print("nothing to give feedback on yet: send a message first")
        return
    print("training on your feedback...", flush=True)
    item = FeedbackItem(completion_id=completion_id, feedback=text)
    try:
        done = claas.feedback.send_and_wait(item, timeout=timeout)
    except ClaasAPIError as error:
        print(f"claas: error {error.status}: {error.message}", file=sys.stderr)
        return
    except FeedbackTimeout as error:
        print(f"claas: {error}", file=sys.stderr)
        return
    except httpx.HTTPError as error:  # the chat goes on; the user may retry
        print(f"claas: error: no answer from {claas.base_url} ({error})", file=sys.stderr)
        return
    if done.status == "failed":
        print(f"claas: error: the feedback failed: {done.error}", file=sys.stderr)
        return
    print(f"{done.lora_id} is now at version {done.version}; the next answer comes from it")


def cmd_eval(args: argparse.Namespace) -> int:
    """An automated feedback loop against a server (or an in-process one); or compare two runs,
    or take the mean and spread of runs under several seeds."""
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
        "its lease (CLAAS_LEASE_SECONDS) ends.\n\n" + _settings_help(),
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
    adapters = sub.add_parser("adapters", help="manage adapters on a running server")
    actions = adapters.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", parents=[remote], help="create owner/name")
    create.add_argument("lora_id", type=_lora_id)
    create.add_argument("--rank", type=int, default=32)
    create.add_argument("--lora-alpha", type=float)
    create.add_argument("--target-modules", help="comma-separated, e.g. q_proj,v_proj")
    listing = actions.add_parser("list", parents=[remote], help="list adapters")
    listing.add_argument("--prefix", default="")
    for name, text in [("versions", "an adapter and its versions"), ("delete", "delete all")]:
        action = actions.add_parser(name, parents=[remote], help=text)
        action.add_argument("lora_id", type=_lora_id)
    rollback = actions.add_parser("rollback", parents=[remote], help="serve version N again")
    rollback.add_argument("lora_id", type=_lora_id)
    rollback.add_argument("version", type=int)
    export = actions.add_parser(
        "export", parents=[remote], help="download a version as a PEFT zip, or unpack it"
    )
    export.add_argument("lora_id", type=_lora_id)
    export.add_argument("--version", type=int, help="default: the current version")
    where = export.add_mutually_exclusive_group()
    where.add_argument("--output", "-o", help="the zip to write (default: owner-name.zip)")
    where.add_argument("--dir", help="unpack into this directory instead of writing a zip")
    adapters.set_defaults(handler=cmd_adapters)

    feedback = sub.add_parser("feedback", help="feedback requests on a running server")
    feedback_actions = feedback.add_subparsers(dest="action", required=True)
    send = feedback_actions.add_parser(
        "send",
        parents=[remote],
        help="feedback on an answer: trains its adapter",
        description="Name the answer by --completion-id (the chat completion's id), or by "
        "--adapter, --prompt and --response (its texts).",
    )
    send.add_argument("--completion-id", help="the id of the chat completion")
    send.add_argument("--adapter", type=_lora_id, help="owner/name that gave the answer")
    send.add_argument("--prompt", help="the user message the answer replied to")
    send.add_argument("--response", help="the answer's text")
    send.add_argument("--feedback", required=True, help="what to change, e.g. 'shorter please'")
    send.add_argument(
        "--training",
        type=_json_object,
        help="training config fields to override, as JSON, e.g. '{\"steps_per_batch\": 1}'",
    )
    send.add_argument(
        "--wait", action="store_true", help="wait until trained; print the new version"
    )
    status = feedback_actions.add_parser("status", parents=[remote], help="status and metrics")
    status.add_argument("feedback_id")
    log = feedback_actions.add_parser("log", parents=[remote], help="an adapter's feedback")
    log.add_argument("lora_id", type=_lora_id)
    log.add_argument("--limit", type=int, default=50)
    log.add_argument("--offset", type=int, default=0)
    feedback.set_defaults(handler=cmd_feedback)

    chat = sub.add_parser(
        "chat",
        parents=[remote],
        help="chat in the terminal; /feedback TEXT trains the adapter on the last answer",
        description="Type a message to chat. /feedback TEXT trains the adapter on the last "
        "answer and waits for the new version, which answers from then on; /reset starts a new "
        "conversation; /quit or Ctrl-D exits.",
    )
    chat.add_argument("model", help="owner/name (or owner/name@N, or the base model's name)")
    chat.add_argument("--system", help="a system message that opens the conversation")
    chat.add_argument("--temperature", type=float, default=0.7, help="[default: 0.7]")
    chat.add_argument("--max-tokens", type=int, default=256, help="per answer [default: 256]")
    chat.set_defaults(handler=cmd_chat)

    from claas.eval.command import add_arguments as add_eval_arguments

    evaluate = sub.add_parser(
        "eval",
        parents=[common],
        help="teach preferences by feedback and measure them; `eval compare A B` compares runs; "
        "`eval seeds A B ...` gives their mean and spread",
        description="claas eval [options] [KEY=VALUE ...]  |  claas eval compare RUN_A RUN_B  |  "
        "claas eval seeds RUN_A RUN_B ... [--out FILE.json]",
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


if __name__ == "__main__":
    sys.exit(main())
