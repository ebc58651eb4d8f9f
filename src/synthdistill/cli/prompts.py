"""``synthdistill prompts``: stage 1, class names become text prompts (prompts.jsonl)."""

from __future__ import annotations

import argparse
from pathlib import Path

from synthdistill.cli.common import add_domain_arguments, add_recipe_arguments, domain_of, recipe_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prompts",
        help="Write diverse text prompts for the classes (template or LLM).",
        description="Stage 1: one JSON line per prompt (class, prompt, image seed, contextual options).",
    )
    add_domain_arguments(parser)
    group = parser.add_argument_group("prompts")
    group.add_argument(
        "--per-class", type=int, help="Prompts per class (default: the dataset's images per class)."
    )
    group.add_argument("--generator", choices=("template", "llm"), help="'template' (default) or 'llm'.")
    group.add_argument(
        "--llm", metavar="MODEL", help="Chat LLM for --generator llm: hub id, local folder or 'tiny'."
    )
    group.add_argument("--out", metavar="FILE", help="Output JSONL (default: <run dir>/prompts.jsonl).")
    add_recipe_arguments(parser)
    parser.set_defaults(func=prompts_command)


def prompts_command(args: argparse.Namespace) -> None:
    from synthdistill.prompts import write_prompts

    flags = {"per_class": "prompts.per_class", "generator": "prompts.generator", "llm": "prompts.llm"}
    recipe = recipe_from_args(args, flags)
    domain = domain_of(recipe)
    out = Path(args.out) if args.out else recipe.run_path / "prompts.jsonl"
    summary = write_prompts(domain, recipe.prompts, out, seed=recipe.seed, device=recipe.device)
    print(summary.describe())
