"""``synthdistill predict``: top-k classes of image files with an exported ONNX model or a student folder."""

from __future__ import annotations

import argparse

from synthdistill.cli.common import add_domain_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="Classify images with an exported ONNX model or a student folder.",
        description=(
            "Print the top-k classes with probabilities for each image (files, folders searched "
            "recursively, glob patterns). Unreadable files are reported on stderr and skipped."
        ),
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--model",
        metavar="FILE",
        help="An exported model.onnx, model.fp16.onnx or model.int8.onnx (runs on onnxruntime).",
    )
    model.add_argument(
        "--student",
        metavar="DIR",
        help="A student folder (runs on PyTorch); classes from --labels, --dataset or --classes.",
    )
    parser.add_argument(
        "--labels",
        metavar="FILE",
        help="With --student: the labels.json of its export, so it classifies exactly as the exported "
        "model (default: <run directory>/export/labels.json beside the student folder).",
    )
    parser.add_argument("images", nargs="+", help="Image files, folders or glob patterns ('photos/*.jpg').")
    parser.add_argument("--top-k", type=int, default=5, help="Classes shown per image (default 5).")
    parser.add_argument("--batch-size", type=int, default=32, help="Images per forward pass (default 32).")
    parser.add_argument(
        "--json",
        action="store_true",
        help="Print one JSON list instead of text; skipped files are in it with the reason ('skipped').",
    )
    add_domain_arguments(parser)
    parser.set_defaults(func=predict_command)


def predict_command(args: argparse.Namespace) -> None:
    import json
    import sys
    from pathlib import Path

    from synthdistill.deploy.predict import predict
    from synthdistill.errors import SynthdistillError
    from synthdistill.registry import resolve_domain

    domain = None
    if args.dataset or args.classes:
        domain = resolve_domain(args.dataset, args.classes, args.superclass)
    skipped: list[dict] = []

    def on_skip(path: object, reason: str) -> None:
        print(f"skipped '{path}': it {reason}", file=sys.stderr)
        skipped.append({"path": str(path), "skipped": f"it {reason}"})

    options = {"domain": domain, "top_k": args.top_k, "batch_size": args.batch_size, "on_skip": on_skip}
    if args.model:
        if args.labels:
            raise SynthdistillError("--labels goes with --student; an ONNX model carries its own classes.")
        predictions = predict(Path(args.model), args.images, **options)
    else:
        from synthdistill.deploy.zero_shot import predict_student

        labels = Path(args.labels) if args.labels else None
        predictions = predict_student(Path(args.student), args.images, labels=labels, **options)
    if args.json:  # every file named, the skipped ones with the reason
        rows = [p.to_dict() for p in predictions] + skipped
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    for prediction in predictions:
        print(prediction.path)
        for name, probability in zip(prediction.classes, prediction.probabilities, strict=True):
            print(f"  {probability:7.2%}  {name}")
