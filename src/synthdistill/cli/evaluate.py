"""``synthdistill evaluate``: zero-shot accuracy on real test sets, student and teacher side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from synthdistill.cli.common import add_domain_arguments, add_recipe_arguments, domain_of, recipe_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="Zero-shot accuracy of a student and its teacher on real test sets (CLIP_benchmark's and/or "
        "the paper's protocol).",
        description=(
            "Evaluate a student (with the teacher named in its config.json on the same images) or a teacher "
            "alone on registry test sets under --data-root, or on an image folder, under each protocol of "
            "--protocols. Writes results.json and results.md and prints the table. See the README for the "
            "expected data layout."
        ),
    )
    models = parser.add_mutually_exclusive_group()
    models.add_argument(
        "--student", metavar="DIR", help="Student folder; default: the recipe's run directory/student."
    )
    models.add_argument("--teacher-only", action="store_true", help="Evaluate the teacher alone.")
    parser.add_argument(
        "--teacher",
        help="open_clip model name or 'tiny'; default: the student's teacher (or distill.teacher).",
    )
    parser.add_argument(
        "--teacher-pretrained",
        help="open_clip pretrained tag or local file; default: the student's (or the recipe's).",
    )
    parser.add_argument(
        "--datasets", help="Comma-separated registry datasets, e.g. pets,flowers102 (evaluate.datasets)."
    )
    parser.add_argument(
        "--data-root", metavar="DIR", help="Folder holding the test sets (evaluate.data_root)."
    )
    parser.add_argument(
        "--image-folder",
        metavar="DIR",
        help="An ImageFolder-style test set or WebDataset mirror folder; class names from --classes or "
        "the folder (evaluate.image_folder).",
    )
    parser.add_argument(
        "--protocols",
        "--protocol",
        metavar="NAMES",
        help="Comma-separated: clip_benchmark (default), paper, or both (evaluate.protocols).",
    )
    parser.add_argument("--batch-size", type=int, help="Images per batch (evaluate.batch_size).")
    parser.add_argument("--workers", type=int, help="Data-loader worker processes (evaluate.workers).")
    parser.add_argument(
        "--download", action="store_true", default=None, help="Let torchvision download missing test sets."
    )
    parser.add_argument(
        "--precision",
        help="auto, fp32, bf16 or fp16 (evaluate.precision); autocast as CLIP_benchmark's amp does it. "
        "The paper protocol always runs in fp32.",
    )
    parser.add_argument(
        "--max-images", type=int, help="At most this many images per test set (quick checks)."
    )
    parser.add_argument("--out", metavar="DIR", help="Output folder; default: <run directory>/eval.")
    add_domain_arguments(parser)
    add_recipe_arguments(parser)
    parser.set_defaults(func=evaluate_command)


def evaluate_command(args: argparse.Namespace) -> None:
    from synthdistill.evaluate import RESULTS_JSON, evaluate

    recipe = recipe_from_args(
        args,
        {
            "datasets": "evaluate.datasets",
            "data_root": "evaluate.data_root",
            "image_folder": "evaluate.image_folder",
            "protocols": "evaluate.protocols",
            "batch_size": "evaluate.batch_size",
            "workers": "evaluate.workers",
            "download": "evaluate.download",
            "precision": "evaluate.precision",
            "max_images": "evaluate.max_images",
        },
    )
    student_dir = None
    teacher, teacher_pretrained = args.teacher, args.teacher_pretrained
    if args.teacher_only:
        teacher = teacher or recipe.distill.teacher
        teacher_pretrained = teacher_pretrained or recipe.distill.teacher_pretrained
        run_dir = recipe.run_path
    else:
        student_dir = Path(args.student) if args.student else recipe.run_path / "student"
        run_dir = student_dir.parent
    # an image folder takes its class names from its own folders unless the classes are named
    folder_names_classes = recipe.evaluate.image_folder is not None and not _classes_named(args)
    out_dir = Path(args.out) if args.out else run_dir / "eval"
    results = evaluate(
        recipe.evaluate,
        out_dir,
        student_dir=student_dir,
        teacher=teacher,
        teacher_pretrained=teacher_pretrained,
        domain=None if folder_names_classes else domain_of(recipe),
        device=recipe.device,
    )
    print(results.to_markdown(), end="")
    print(f"\nresults: {out_dir / RESULTS_JSON}")


def _classes_named(args: argparse.Namespace) -> bool:
    """Whether --dataset, --classes, a --set or a recipe file names the classes (the recipe's default
    dataset does not: an image folder then takes its class names from its own folders)."""
    if args.dataset is not None or args.classes is not None:
        return True
    keys = ("dataset", "classes_file")
    if any(override.split("=", 1)[0].strip() in keys for override in args.overrides):
        return True
    for path in args.config or []:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if any(key in data for key in keys):
            return True
    return False
