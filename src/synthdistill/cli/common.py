"""Arguments shared by the stage commands: a recipe, overrides, and the domain."""

from __future__ import annotations

import argparse
import sys

from synthdistill.config import RecipeConfig, apply_overrides, load_recipe
from synthdistill.errors import Style
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
    args.recipe_flags = flags  # error hints name these flags (cli_style)
    explicit = {
        key: getattr(args, attr) for attr, key in flags.items() if getattr(args, attr, None) is not None
    }
    if "classes_file" in explicit and "dataset" not in explicit:
        explicit["dataset"] = None
    recipe = load_recipe(getattr(args, "config", None), explicit)
    recipe = apply_overrides(recipe, getattr(args, "overrides", []))
    if "classes_file" in explicit and recipe.superclass is None:
        word = domain_of(recipe).superclass
        print(
            f"warning: no --superclass for '{recipe.classes_file}', so '{word}' is used as every class's "
            "superclass; name yours with e.g. --superclass bird",
            file=sys.stderr,
        )
    return recipe


def domain_of(recipe: RecipeConfig) -> Domain:
    return resolve_domain(recipe.dataset, recipe.classes_file, recipe.superclass)


def cli_style(flags: dict[str, str]) -> Style:
    """Error hints for a command whose flags set the recipe keys of ``flags`` (argument name ->
    key): ``--llm PATH`` for a key with a flag, ``--download`` for a switch, ``--set key=VALUE``
    otherwise; a pipeline argument as its flag (``--force``)."""
    by_key = {key: "--" + attr.replace("_", "-") for attr, key in flags.items()}

    def style(kind: str, name: str, value: str) -> str:
        if kind == "arg":
            return name
        flag = by_key.get(name)
        if flag is None:
            return f"--set {name}={value}"
        return flag if value == "true" else f"{flag} {value}"

    return style
