"""``synthdistill distill``: stage 3, the teacher's image encoder into a student (also under torchrun)."""

from __future__ import annotations

import argparse
from pathlib import Path

from synthdistill.cli.common import add_domain_arguments, add_recipe_arguments, domain_of, recipe_from_args
from synthdistill.errors import SynthdistillError
from synthdistill.rundir import RunDir

# flag -> recipe key
FLAGS = {
    "teacher": "distill.teacher",
    "teacher_pretrained": "distill.teacher_pretrained",
    "student": "distill.student",
    "loss": "distill.loss",
    "epochs": "distill.epochs",
    "batch_size": "distill.batch_size",
    "lr": "distill.lr",
    "workers": "distill.workers",
    "train_data": "distill.train_data",
    "train_num_samples": "distill.train_num_samples",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="Train a student to reproduce the teacher's image embeddings on the synthetic shards.",
        description="Distil a CLIP teacher's image encoder into a timm student, on the run's synthetic "
        "shards or on streamed data (--train-data). Resumes from the newest checkpoint of the same "
        "settings; run under `torchrun --nproc_per_node N -m synthdistill distill` to use N GPUs (or "
        "--nnodes M for several machines). Defaults come from the recipe and its run directory "
        "(runs/<name>).",
    )
    paths = parser.add_argument_group("paths")
    paths.add_argument(
        "--shards",
        type=Path,
        metavar="DIR",
        help="Folder of shard-*.tar files (default: <run>/shards; not used with --train-data).",
    )
    paths.add_argument(
        "--train-data",
        metavar="SPEC",
        help="Train on other data than the run's shards: WebDataset shards as brace-expanded paths or "
        "URLs ('/data/datacomp/{00000000..00012895}.tar', pipe: commands, s3://...), a folder of .tar "
        "shards, or an ImageFolder tree as imagenet:DIR.",
    )
    paths.add_argument(
        "--train-num-samples",
        type=int,
        metavar="N",
        help="Samples per epoch of --train-data, all ranks together (sets the number of steps).",
    )
    paths.add_argument(
        "--out", type=Path, metavar="DIR", help="Student folder to write (default: <run>/student)."
    )
    paths.add_argument(
        "--checkpoints",
        type=Path,
        metavar="DIR",
        help="Checkpoint folder (default: beside an --out named student/, as in a run directory, "
        "else <out>/checkpoints, so two --out folders never share one).",
    )
    paths.add_argument(
        "--cache", type=Path, metavar="DIR", help="Teacher-cache folder (default: <shards>/../teacher_cache)."
    )
    training = parser.add_argument_group("training (recipe keys distill.*)")
    training.add_argument("--teacher", help="open_clip model name, local checkpoint, or 'tiny'.")
    training.add_argument(
        "--teacher-pretrained",
        help="open_clip pretrained tag or local file (none: --set distill.teacher_pretrained=null).",
    )
    training.add_argument("--student", help="timm model name, or 'tiny'.")
    training.add_argument("--loss", help="fd, vl, mpc, or a weighted sum such as 'fd:1,vl:0.5'.")
    training.add_argument("--epochs", type=int, help="Passes over the images.")
    training.add_argument("--batch-size", type=int, help="Global batch size (split across processes).")
    training.add_argument("--lr", type=float, help="AdamW learning rate.")
    training.add_argument("--workers", type=int, help="Data-loader worker processes per process.")
    training.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Continue from the newest checkpoint of the same settings (default); --no-resume starts over.",
    )
    add_recipe_arguments(parser)
    add_domain_arguments(parser)
    parser.set_defaults(func=distill_command)


def checkpoints_for(out: Path | None, run: RunDir) -> Path:
    """Where a student's checkpoints go: beside a ``student/`` folder (a run directory's layout:
    ``runs/<name>/checkpoints``), else inside ``--out``, so two students never share a folder."""
    if out is None:
        return run.checkpoints
    return out.parent / "checkpoints" if out.name == "student" else out / "checkpoints"


def distill_command(args: argparse.Namespace) -> None:
    from synthdistill.runtime import dist_env
    from synthdistill.train import distill_student
    from synthdistill.train.validate import validation_data

    recipe = recipe_from_args(args, FLAGS)
    run = RunDir(recipe.run_path)
    if args.shards and recipe.distill.train_data:
        raise SynthdistillError(
            "Both --shards and distill.train_data name the training data; give one (with a recipe that "
            "sets train_data, add --set distill.train_data=null to train on --shards)."
        )
    domain = domain_of(recipe)
    evaluate = recipe.evaluate
    validation = validation_data(
        evaluate.datasets, domain, evaluate.data_root, evaluate.batch_size, evaluate.workers
    )
    summary = distill_student(
        None if recipe.distill.train_data else args.shards or run.shards,
        args.out or run.student,
        recipe.distill,
        domain=domain,
        seed=recipe.seed,
        device=recipe.device,
        checkpoint_dir=args.checkpoints or checkpoints_for(args.out, run),
        cache_dir=args.cache,
        resume=args.resume,
        validation=validation,
    )
    if dist_env().is_main:
        details = [f"{summary.steps} steps"]
        if summary.final_loss is not None:
            details += [f"loss {summary.final_loss:.4f}", f"cosine to teacher {summary.final_cosine:.4f}"]
        if summary.corrupt_keys:
            details.append(f"{len(summary.corrupt_keys)} corrupt images skipped (see train_log.jsonl)")
        if summary.corrupt_samples or summary.failed_shards:
            details.append(
                f"{summary.corrupt_samples} undecodable samples and {summary.failed_shards} unreadable "
                "shards skipped over the epochs (see train_log.jsonl)"
            )
        if summary.best_epoch is not None:
            kept = f", {summary.best_checkpoint}" if summary.best_checkpoint else ""
            details.append(f"best epoch {summary.best_epoch}: validation top-1 {summary.best_top1:.4f}{kept}")
        print(f"student: {summary.student_dir} ({', '.join(details)})")
