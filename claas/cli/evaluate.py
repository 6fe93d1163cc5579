"""`claas eval`: an automated feedback loop against a server (or an in-process one) that
measures what feedback taught; `eval compare` and `eval seeds` compare runs. The work is
`claas.eval.command`'s; this module only wires it into the command line.
"""

from __future__ import annotations

import argparse

from claas.cli.local import settings_from


def add_eval_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """`eval`, with the options `claas.eval.command` defines."""
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


def cmd_eval(args: argparse.Namespace) -> int:
    """An automated feedback loop against a server (or an in-process one); or compare two runs,
    or take the mean and spread of runs under several seeds."""
    from claas.eval.command import eval_command

    return eval_command(args, settings_from(args))
