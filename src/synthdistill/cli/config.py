"""``synthdistill config keys|show``: what a recipe may say, and what a recipe resolves to."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from synthdistill.cli.common import add_recipe_arguments, recipe_from_args
from synthdistill.config import RecipeConfig, dump_recipe


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "config", help="List recipe keys, or print a recipe with overrides applied."
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    keys = sub.add_parser("keys", help="Every recipe key with its default and meaning.")
    keys.set_defaults(func=keys_command)
    show = sub.add_parser("show", help="The effective recipe (file + --set) as YAML; validates it.")
    add_recipe_arguments(show)
    show.set_defaults(func=show_command)


def _rows(cls: type, instance: object, prefix: str = "") -> list[tuple[str, str, str]]:
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(_rows(hints[f.name], value, f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", repr(value), f.metadata.get("help", "")))
    return rows


def keys_command(args: argparse.Namespace) -> None:
    rows = _rows(RecipeConfig, RecipeConfig())
    width = max(len(k) for k, _, _ in rows)
    for key, default, help_text in rows:
        print(f"{key.ljust(width)}  {help_text} [default: {default}]")


def show_command(args: argparse.Namespace) -> None:
    print(dump_recipe(recipe_from_args(args)), end="")
