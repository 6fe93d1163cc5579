"""`claas feedback`: send feedback on an answer (and wait for the version it trains), read a
request's status, or list an adapter's feedback log, on a running server.
"""

from __future__ import annotations

import argparse
import sys
import time

from claas.cli.remote import json_object, lora_id, print_json, remote_client, remote_options
from claas.client import FeedbackItem, FeedbackView


def add_feedback_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`feedback send|status|log`."""
    remote = remote_options()
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
    send.add_argument("--adapter", type=lora_id, help="owner/name that gave the answer")
    send.add_argument("--prompt", help="the user message the answer replied to")
    send.add_argument("--response", help="the answer's text")
    send.add_argument("--feedback", required=True, help="what to change, e.g. 'shorter please'")
    send.add_argument(
        "--training",
        type=json_object,
        help="training config fields to override, as JSON, e.g. '{\"steps_per_batch\": 1}'",
    )
    send.add_argument(
        "--wait", action="store_true", help="wait until trained; print the new version"
    )
    status = feedback_actions.add_parser("status", parents=[remote], help="status and metrics")
    status.add_argument("feedback_id")
    log = feedback_actions.add_parser("log", parents=[remote], help="an adapter's feedback")
    log.add_argument("lora_id", type=lora_id)
    log.add_argument("--limit", type=int, default=50)
    log.add_argument("--offset", type=int, default=0)
    feedback.set_defaults(handler=cmd_feedback)


def cmd_feedback(args: argparse.Namespace) -> int:
    """Send feedback, read a request's status, or list an adapter's feedback log."""
    with remote_client(args) as claas:
        if args.action == "status":
            return print_json(claas.feedback.status(args.feedback_id).model_dump(mode="json"))
        if args.action == "log":
            log = claas.feedback.log(args.lora_id, args.limit, args.offset)
            return print_log(args.lora_id, log)
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
            return print_json(claas.feedback.send(item).model_dump(mode="json"))
        return print_trained(claas.feedback.send_and_wait(item, timeout=args.timeout))


def print_trained(done: FeedbackView) -> int:
    """The outcome of a waited-for request: the new version and its metrics, or why it failed."""
    if done.status == "failed":
        print(f"claas: error: feedback {done.feedback_id} failed: {done.error}", file=sys.stderr)
        return 1
    print(f"feedback {done.feedback_id} done: {done.lora_id} is now at version {done.version}")
    # The per-step records and teacher texts are long; `claas feedback status` shows them.
    summary = {k: v for k, v in done.metrics.items() if k not in ("steps", "teacher_texts")}
    return print_json(summary)


def print_log(lora_id: str, log: list[FeedbackView]) -> int:
    """One line per request, newest first: id, status, version produced, time, feedback."""
    if not log:
        print(f"no feedback on {lora_id} yet")
    for request in log:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(request.created_at))
        version = f"v{request.version}" if request.version is not None else "-"
        text = " | ".join(str(item.get("feedback", "")) for item in request.items)
        print(f"{request.feedback_id}  {request.status:<7}  {version:<4}  {when}  {text}")
    return 0
