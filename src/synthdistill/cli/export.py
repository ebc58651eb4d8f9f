"""``synthdistill export``: a student folder -> ONNX / TorchScript / open_clip model + model card."""

from __future__ import annotations

import argparse

from synthdistill.cli.common import add_domain_arguments, add_recipe_arguments, domain_of, recipe_from_args

FORMATS = ("onnx", "torchscript", "open_clip")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="Export the student and its zero-shot head as ONNX, TorchScript or an open_clip model.",
        description=(
            "Export a student folder with the teacher's zero-shot head for the chosen classes as one "
            "deployable classifier; every file is verified against PyTorch, and MODEL_CARD.md records "
            "parameters, FLOPs and CPU latency next to the teacher."
        ),
    )
    parser.add_argument("--student", metavar="DIR", help="Student folder; default: <run directory>/student.")
    parser.add_argument("--out", metavar="DIR", help="Output folder; default: <run directory>/export.")
    parser.add_argument(
        "--format",
        dest="formats",
        nargs="+",
        choices=FORMATS,
        help="Formats to write (recipe key: export.formats; default onnx).",
    )
    parser.add_argument("--opset", type=int, help="ONNX opset, 18 or more (recipe key: export.opset).")
    parser.add_argument(
        "--no-bench",
        dest="bench",
        action="store_false",
        default=None,
        help="Skip the CPU latency benchmark in the model card (recipe key: export.bench).",
    )
    parser.add_argument(
        "--eval-results",
        metavar="FILE",
        help="Evaluation results for the model card; default: <run directory>/eval/results.json if present.",
    )
    add_domain_arguments(parser)
    add_recipe_arguments(parser)
    parser.set_defaults(func=export_command)


def export_command(args: argparse.Namespace) -> None:
    from pathlib import Path

    from synthdistill.export import export_student
    from synthdistill.rundir import RunDir

    recipe = recipe_from_args(
        args, {"formats": "export.formats", "opset": "export.opset", "bench": "export.bench"}
    )
    run = RunDir(recipe.run_path)
    eval_results = Path(args.eval_results) if args.eval_results else run.eval / "results.json"
    summary = export_student(
        Path(args.student) if args.student else run.student,
        domain_of(recipe),
        Path(args.out) if args.out else run.export,
        recipe.export,
        eval_results=eval_results if args.eval_results or eval_results.is_file() else None,
        device=recipe.device,
    )
    for name, path in summary.files.items():
        difference = summary.max_difference.get(name)
        checked = f"  (verified, max difference {difference:.1e})" if difference is not None else ""
        print(f"{name:12s} {path}{checked}")
    print(
        f"student {summary.student_parameters:,} parameters, "
        f"{summary.student_flops / 1e9:.3g} GFLOPs/image; teacher image encoder "
        f"{summary.teacher_parameters:,}, {summary.teacher_flops / 1e9:.3g} GFLOPs/image"
    )
    for row in summary.latency:
        print(
            f"{row.model} batch {row.batch_size}: {row.milliseconds:.2f} ms "
            f"({row.images_per_second:.1f} images/s)"
        )
