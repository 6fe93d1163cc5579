"""`claas chat`: a terminal chat with a model on a running server, through its OpenAI API;
`/feedback TEXT` trains the adapter on the last answer and waits for the new version.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import httpx

from claas.cli.remote import remote_client, remote_options
from claas.client import ClaasAPIError, Client, FeedbackItem, FeedbackTimeout

if TYPE_CHECKING:
    import openai
    from openai import OpenAI
    from openai.types.chat import ChatCompletionMessageParam


def add_chat_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`chat MODEL`."""
    remote = remote_options()
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


def cmd_chat(args: argparse.Namespace) -> int:
    """A terminal chat with a model; `/feedback TEXT` trains the adapter on the last answer."""
    with remote_client(args) as claas, claas.openai() as chat:
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
