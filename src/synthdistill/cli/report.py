"""``synthdistill report RUN_DIR``: rebuild a run's report.md and report.html."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="Rebuild a run's report.md and report.html.")
    parser.add_argument("run_dir", help="The run directory, e.g. runs/pets.")
    parser.set_defaults(func=report_command)


def report_command(args: argparse.Namespace) -> None:
    from synthdistill.report import write_report

    path = write_report(args.run_dir)
    print(f"report: {path} (and {path.with_suffix('.html')})")
