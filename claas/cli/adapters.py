"""`claas adapters`: the adapter lifecycle (create, list, versions, rollback, delete, export)
against a running server.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from claas.cli.remote import lora_id, print_json, remote_client, remote_options


def add_adapters_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`adapters create|list|versions|rollback|delete|export`."""
    remote = remote_options()
    adapters = sub.add_parser("adapters", help="manage adapters on a running server")
    actions = adapters.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", parents=[remote], help="create owner/name")
    create.add_argument("lora_id", type=lora_id)
    create.add_argument("--rank", type=int, default=32)
    create.add_argument("--lora-alpha", type=float)
    create.add_argument("--target-modules", help="comma-separated, e.g. q_proj,v_proj")
    listing = actions.add_parser("list", parents=[remote], help="list adapters")
    listing.add_argument("--prefix", default="")
    for name, text in [("versions", "an adapter and its versions"), ("delete", "delete all")]:
        action = actions.add_parser(name, parents=[remote], help=text)
        action.add_argument("lora_id", type=lora_id)
    rollback = actions.add_parser("rollback", parents=[remote], help="serve version N again")
    rollback.add_argument("lora_id", type=lora_id)
    rollback.add_argument("version", type=int)
    export = actions.add_parser(
        "export", parents=[remote], help="download a version as a PEFT zip, or unpack it"
    )
    export.add_argument("lora_id", type=lora_id)
    export.add_argument("--version", type=int, help="default: the current version")
    where = export.add_mutually_exclusive_group()
    where.add_argument("--output", "-o", help="the zip to write (default: owner-name.zip)")
    where.add_argument("--dir", help="unpack into this directory instead of writing a zip")
    adapters.set_defaults(handler=cmd_adapters)


def cmd_adapters(args: argparse.Namespace) -> int:
    """Adapter lifecycle against a running server."""
    with remote_client(args) as claas:
        if args.action == "create":
            targets = args.target_modules.split(",") if args.target_modules else None
            created = claas.adapters.create(
                args.lora_id, rank=args.rank, lora_alpha=args.lora_alpha, target_modules=targets
            )
            return print_json(created.model_dump(mode="json"))
        if args.action == "list":
            adapters = claas.adapters.list(args.prefix)
            return print_json({"data": [a.model_dump(mode="json") for a in adapters]})
        if args.action == "versions":
            return print_json(claas.adapters.get(args.lora_id).model_dump(mode="json"))
        if args.action == "rollback":
            rolled = claas.adapters.rollback(args.lora_id, args.version)
            return print_json(rolled.model_dump(mode="json"))
        if args.action == "delete":
            return print_json(claas.adapters.delete(args.lora_id).model_dump(mode="json"))
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
