"""``synthdistill run RECIPE.yaml``: the whole pipeline in one run directory."""

from __future__ import annotations

import argparse

from synthdistill.config import STAGES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="Run prompts -> generate -> distill -> evaluate -> export from a recipe.",
        description="Run the recipe's stages in order in runs/<name>. Finished stages are skipped, an "
        "interrupted stage resumes (what a killed run left half-written is removed first), and outputs made "
        "under other result settings are refused unless --force; speed-only settings (batch sizes, workers, "
        "compile) never invalidate an output.",
    )
    parser.add_argument(
        "recipes", nargs="+", metavar="RECIPE.yaml", help="Recipe file(s); later files override earlier ones."
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override any recipe key, e.g. --set distill.student=efficientnet_b0.",
    )
    parser.add_argument("--name", help="Run name (the run lives in runs/<name>).")
    parser.add_argument(
        "--classes", metavar="FILE", help="Your own class list, one per line (recipe key: classes_file)."
    )
    parser.add_argument("--superclass", help="Superclass word for --classes, e.g. 'bird' (default 'object').")
    parser.add_argument("--run-dir", help="Run directory (default runs/<name>).")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N.")
    parser.add_argument("--until", choices=STAGES, help="Stop after this stage.")
    parser.add_argument(
        "--from",
        dest="start_from",
        choices=STAGES,
        help="Run this stage and all after it again; outputs whose settings did not change are kept and "
        "resumed on, the others replaced.",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="Redo stages whose result settings changed, replacing their outputs; unchanged finished stages "
        "are kept.",
    )
    parser.add_argument("--no-report", dest="report", action="store_false", help="Do not write the report.")
    parser.set_defaults(func=run_command)


# flag -> recipe key
FLAGS = {
    "name": "name",
    "run_dir": "run_dir",
    "device": "device",
    "classes": "classes_file",
    "superclass": "superclass",
}


def run_command(args: argparse.Namespace) -> None:
    from synthdistill.cli.common import recipe_from_args
    from synthdistill.pipeline import run_pipeline
    from synthdistill.runtime import dist_env

    args.config = args.recipes
    recipe = recipe_from_args(args, FLAGS)
    result = run_pipeline(
        recipe, until=args.until, start_from=args.start_from, force=args.force, report=args.report
    )
    if dist_env().is_main:
        print(f"run finished: {result.run_dir}")
