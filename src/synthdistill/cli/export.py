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
            "parameters, FLOPs and ONNX Runtime latency next to the teacher's image tower."
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
        "--precision",
        nargs="+",
        choices=("fp32", "fp16", "int8"),
        help="ONNX forms to write (recipe key: export.precision; default fp32); fp16 and int8 are kept "
        "only if they agree with fp32 on export.min_agreement of held-out synthetic images (and of the "
        "real test sets, when evaluate ran on them).",
    )
    parser.add_argument(
        "--no-bench",
        dest="bench",
        action="store_false",
        default=None,
        help="Skip the ONNX Runtime latency measurement in the model card (recipe key: export.bench).",
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

    from synthdistill.deploy.export import export_student
    from synthdistill.pipeline import export_test_sets
    from synthdistill.rundir import RunDir

    recipe = recipe_from_args(
        args,
        {
            "formats": "export.formats",
            "opset": "export.opset",
            "precision": "export.precision",
            "bench": "export.bench",
        },
    )
    run = RunDir(recipe.run_path)
    eval_results = Path(args.eval_results) if args.eval_results else run.eval / "results.json"
    eval_results = eval_results if args.eval_results or eval_results.is_file() else None
    domain = domain_of(recipe)
    summary = export_student(
        Path(args.student) if args.student else run.student,
        domain,
        Path(args.out) if args.out else run.export,
        recipe.export,
        eval_results=eval_results,
        test_sets=export_test_sets(recipe, domain, eval_results),
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
    for form in summary.forms:
        if form.written:
            tests = "".join(
                f", {t.agreement:.1%} on {t.images} of {t.test_set}" for t in form.test_agreements
            )
            print(
                f"{form.precision}: top-1 agreement with fp32 {form.agreement:.1%} "
                f"on {form.held_out_images} held-out synthetic images{tests}"
            )
        else:
            print(form.refusal())
    for row in summary.latency:
        print(
            f"{row.model} {row.precision} {row.provider} batch {row.batch_size}: {row.milliseconds:.2f} ms "
            f"[IQR {row.timing.q1_ms:.2f}-{row.timing.q3_ms:.2f}, {row.timing.runs} runs] "
            f"({row.images_per_second:.1f} images/s)"
        )
