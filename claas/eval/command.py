"""`claas eval` on the command line: parse, pick the server, run, print the summary table.

    claas eval [--config FILE] [--url URL] [--api-key KEY] [--output-dir DIR] [KEY=VALUE ...]
    claas eval compare RUN_A RUN_B [--out PLOT.png]
    claas eval seeds RUN_DIR RUN_DIR [...] [--out FILE.json]

Without `--url`, the eval starts an in-process server on the configured base model (the
embedded default unless `--model`/`CLAAS_MODEL` says otherwise) with the usual data dir, and
lets it run as many generations at once as the eval's `concurrency`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from claas.settings import Settings

SUMMARY_COLUMNS = (
    "preference",
    "baseline_compliance",
    "final_compliance",
    "peak_compliance",
    "retention",
    "steps_to_0.8",
    "length_change_pct",
    "capability_ratio",
    "alerts",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file of eval settings")
    parser.add_argument("--url", help="a running claas server (default: start one in-process)")
    parser.add_argument("--api-key", help="API key for --url (default: $CLAAS_API_KEY)")
    parser.add_argument(
        "--output-dir", type=Path, help="run directory; an existing run there is resumed"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="compare: where to write compare.png; seeds: where to write the report as JSON",
    )
    parser.add_argument(
        "items",
        nargs="*",
        metavar="KEY=VALUE",
        help="overrides, e.g. num_steps=5 training.learning_rate=1e-4 continual=true; "
        "or `compare RUN_A RUN_B`, or `seeds RUN_DIR RUN_DIR ...` (mean and spread over seeds)",
    )


def eval_command(args: argparse.Namespace, settings: Settings) -> int:
    from claas.eval import report
    from claas.eval.config import (
        EvalConfigError,
        merge,
        parse_overrides,
        read_config_file,
        resolve,
    )
    from claas.eval.runner import run_resolved
    from claas.runs import read_summary

    if args.items[:1] == ["compare"]:
        return _compare(args)
    if args.items[:1] == ["seeds"]:
        return _seeds(args)
    if args.out is not None:
        raise EvalConfigError(
            "--out is for `claas eval compare` and `claas eval seeds`; for a run use --output-dir"
        )
    raw: dict[str, Any] = read_config_file(args.config) if args.config is not None else {}
    raw = merge(raw, parse_overrides(args.items))
    if args.output_dir is not None:
        raw["output_dir"] = str(args.output_dir)
    config, run_dir = resolve(raw, settings.data_dir)
    # A SIGTERM (a job scheduler, `kill`) ends the run like Ctrl-C: the summary says "failed"
    # with how to resume, instead of "running" forever.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.url:
            key = args.api_key or os.environ.get("CLAAS_API_KEY")
            run_resolved(config, run_dir, url=args.url, api_key=key)
        else:
            from claas.eval.server import InProcessServer

            with InProcessServer(settings, concurrency=config.concurrency) as url:
                run_resolved(config, run_dir, url=url, api_key=None, label="in-process")
    except KeyboardInterrupt:
        print(
            "claas eval: interrupted; re-run with the same --output-dir to resume", file=sys.stderr
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary = read_summary(run_dir)
    print(report.format_rows(summary.table, SUMMARY_COLUMNS))
    for alert in summary.alerts:
        print(f"alert: {alert.preference} step {alert.run_step}: {alert.message}")
    print(f"\nrun time {report.format_seconds(summary.run_seconds or 0.0)}")
    print(f"wrote {run_dir}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from claas.eval.compare import compare_runs
    from claas.eval.config import EvalConfigError

    if len(args.items) != 3:
        raise EvalConfigError("usage: claas eval compare RUN_A RUN_B [--out PLOT.png]")
    text, plot = compare_runs(Path(args.items[1]), Path(args.items[2]), args.out)
    print(text)
    print(f"\nwrote {plot}")
    return 0


def _seeds(args: argparse.Namespace) -> int:
    from claas.eval import report
    from claas.eval.seeds import seeds_report, seeds_text

    seeds = seeds_report([Path(item) for item in args.items[1:]])
    print(seeds_text(seeds))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report.write_atomic(args.out, seeds.model_dump_json(indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
