"""``synthdistill datasets list|show``: the dataset registry."""

from __future__ import annotations

import argparse

from synthdistill.cli.common import add_domain_arguments
from synthdistill.registry import get_dataset, list_datasets, resolve_domain


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("datasets", help="List the dataset registry or show one dataset.")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="Name, classes, superclass, images per class, evaluation split.")
    listing.set_defaults(func=list_command)
    show = sub.add_parser(
        "show", help="Class names, zero-shot templates, prompt template and contextual dimensions."
    )
    show.add_argument("name", nargs="?", help="Registry dataset name (or use --classes).")
    add_domain_arguments(show)
    show.set_defaults(func=show_command)


def list_command(args: argparse.Namespace) -> None:
    header = ("name", "classes", "superclass", "images/class", "evaluation")
    rows = []
    for name in list_datasets():
        domain = get_dataset(name)
        split = f"{domain.eval.torchvision_class} {domain.eval.split}" if domain.eval else "-"
        rows.append((name, str(domain.num_classes), domain.superclass, str(domain.images_per_class), split))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def show_command(args: argparse.Namespace) -> None:
    domain = resolve_domain(args.name or args.dataset, args.classes, args.superclass)
    print(f"{domain.name}: {domain.title}")
    print(
        f"superclass: {domain.superclass}    images per class: {domain.images_per_class}    "
        f"headline metric: {domain.headline_metric}"
    )
    if domain.eval:
        print(f"evaluation: torchvision {domain.eval.torchvision_class}, split '{domain.eval.split}'")
    print(f"\nclasses ({domain.num_classes}):")
    for index, name in enumerate(domain.classnames):
        print(f"  {index:4d}  {name}")
    print(f"\nzero-shot templates ({len(domain.templates)}):")
    for template in domain.templates:
        print(f"  {template}")
    print(
        f"\ndomain word: {domain.domain_word or '-'}    options per dimension: {domain.options_per_dimension}"
    )
    print(f"prompt template: {domain.prompt_template}")
    print("\ncontextual dimensions: (LLM question, then the registry's options)")
    for number, (dimension, options) in enumerate(domain.contextual_dimensions.items(), start=1):
        question = domain.dimension_questions.get(dimension, "-")
        print(f"  d{number} {dimension}: {question}\n     {'; '.join(options)}")
    if domain.sources:
        print("\nsources:")
        for what, source in domain.sources.items():
            print(f"  {what}: {source}")
