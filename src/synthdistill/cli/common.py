"""Arguments shared by the stage commands: a recipe, overrides, and the domain."""

from __future__ import annotations

import argparse

from synthdistill.config import RecipeConfig, apply_overrides, load_recipe
from synthdistill.registry import Domain, resolve_domain


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("recipe")
    group.add_argument(
        "-c",
        "--config",
        metavar="RECIPE.yaml",
        action="append",
        help="Recipe file to start from; repeat to layer recipes (later ones win).",
    )
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override any recipe key, e.g. --set distill.lr=1e-4 (see `synthdistill config keys`).",
    )
    group.add_argument("--seed", type=int, help="Run seed (recipe key: seed).")
    group.add_argument("--device", help="auto, cpu, cuda or cuda:N (recipe key: device).")


def add_domain_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("classes")
    group.add_argument(
        "--dataset", help="Registry dataset whose classes to use (see `synthdistill datasets list`)."
    )
    group.add_argument("--classes", metavar="FILE", help="Your own class list, one per line ('#' comments).")
    group.add_argument("--superclass", help="Superclass word for --classes, e.g. 'bird'.")


def recipe_from_args(args: argparse.Namespace, flags: dict[str, str] | None = None) -> RecipeConfig:
    """The recipe file, then explicit flags (``flags`` maps argument name -> recipe key), then --set."""
    flags = {
        "seed": "seed",
        "device": "device",
        "dataset": "dataset",
        "classes": "classes_file",
        "superclass": "superclass",
        **(flags or {}),
    }
    explicit = {
        key: getattr(args, attr) for attr, key in flags.items() if getattr(args, attr, None) is not None
    }
    if "classes_file" in explicit and "dataset" not in explicit:
        explicit["dataset"] = None
    recipe = load_recipe(getattr(args, "config", None), explicit)
    return apply_overrides(recipe, getattr(args, "overrides", []))


def domain_of(recipe: RecipeConfig) -> Domain:
    return resolve_domain(recipe.dataset, recipe.classes_file, recipe.superclass)
