"""``synthdistill prompts``: stage 1, class names become text prompts (prompts.jsonl)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from synthdistill.cli.common import add_domain_arguments, add_recipe_arguments, domain_of, recipe_from_args
from synthdistill.config import PromptsConfig


def _choices(key: str) -> tuple[str, ...]:
    """The accepted values of a ``prompts`` key, as declared on its config field."""
    return next(f.metadata["choices"] for f in dataclasses.fields(PromptsConfig) if f.name == key)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prompts",
        help="Write diverse text prompts for the classes (paper, template, plain or llm).",
        description="Stage 1: one JSON line per prompt (class, prompt, image seed, contextual options).",
    )
    add_domain_arguments(parser)
    group = parser.add_argument_group("prompts")
    group.add_argument(
        "--generator",
        choices=_choices("generator"),
        help="'paper' (the authors' LLM procedure), 'template' (default: the paper's structure, no model), "
        "'plain' (no diversity) or 'llm' (our LLM scene sentences).",
    )
    group.add_argument(
        "--design",
        choices=_choices("design"),
        help="'allpairs' (default: the all-pairs design's size per class) or 'random' (--per-class each).",
    )
    group.add_argument(
        "--per-class",
        type=int,
        help="Prompts per class with --design random or --generator plain (default: the dataset's count).",
    )
    group.add_argument(
        "--llm", metavar="MODEL", help="Chat LLM for paper and llm: hub id, local folder or 'tiny'."
    )
    group.add_argument("--out", metavar="FILE", help="Output JSONL (default: <run dir>/prompts.jsonl).")
    add_recipe_arguments(parser)
    parser.set_defaults(func=prompts_command)


def prompts_command(args: argparse.Namespace) -> None:
    from synthdistill.prompts import write_prompts

    flags = {
        "per_class": "prompts.per_class",
        "generator": "prompts.generator",
        "design": "prompts.design",
        "llm": "prompts.llm",
    }
    recipe = recipe_from_args(args, flags)
    domain = domain_of(recipe)
    out = Path(args.out) if args.out else recipe.run_path / "prompts.jsonl"
    summary = write_prompts(domain, recipe.prompts, out, seed=recipe.seed, device=recipe.device)
    print(summary.describe())
