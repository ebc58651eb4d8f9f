"""``synthdistill generate``: prompts.jsonl -> WebDataset shards of synthetic images."""

from __future__ import annotations

import argparse

from synthdistill.cli.common import add_recipe_arguments, recipe_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="Draw one image per prompt with a diffusion model into resumable WebDataset shards.",
        description=(
            "Draw one image per prompt into shard-*.tar files. Rerun the same command to resume; "
            "spread the work with torchrun (one process per GPU) or a job array (--num-shards/--shard-index)."
        ),
    )
    parser.add_argument(
        "--prompts", metavar="FILE", help="prompts.jsonl; default: the recipe's run directory."
    )
    parser.add_argument("--out", metavar="DIR", help="Shard folder; default: <run directory>/shards.")
    parser.add_argument(
        "--model",
        help="Diffusers model id, local folder, 'tiny' or 'tiny-sdxl' (recipe key: generate.model).",
    )
    parser.add_argument(
        "--lora",
        help="LoRA fused into the UNet: hub id, folder or .safetensors file; 'null' for none "
        "(recipe key: generate.lora; default 'auto': the LCM-LoRA for the default SDXL model only).",
    )
    parser.add_argument(
        "--batch-size", type=int, help="Images drawn at once (recipe key: generate.batch_size)."
    )
    parser.add_argument(
        "--num-shards", type=int, metavar="N", help="Split the work into N parts (e.g. a job array's size)."
    )
    parser.add_argument(
        "--shard-index", type=int, metavar="I", help="Write only part I of N, e.g. $SLURM_ARRAY_TASK_ID."
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="Redo this process's shards; replace shards of other prompts/settings.",
    )
    add_recipe_arguments(parser)
    parser.set_defaults(func=generate_command)


def generate_command(args: argparse.Namespace) -> None:
    from synthdistill.generate import generate_images
    from synthdistill.rundir import RunDir

    if args.lora is not None and args.lora.lower() in ("null", "none"):
        args.lora, args.overrides = None, ["generate.lora=null", *args.overrides]
    recipe = recipe_from_args(
        args, {"model": "generate.model", "lora": "generate.lora", "batch_size": "generate.batch_size"}
    )
    run = RunDir(recipe.run_path)
    summary = generate_images(
        args.prompts or run.prompts,
        args.out or run.shards,
        recipe.generate,
        shard_index=args.shard_index,
        num_shards=args.num_shards,
        force=args.force,
        device=recipe.device,
    )
    print(
        f"{summary.images_written} images in {summary.seconds:.1f} s "
        f"({summary.images_per_second:.2f} images/s); "
        f"{summary.shards_written} shards written, {summary.shards_skipped} already complete, "
        f"into {summary.out_dir}"
    )
    if summary.images_retried:
        print(
            f"{summary.images_retried} NaN/black images redrawn with a new seed, "
            f"{summary.images_failed} of them still unusable and skipped"
        )
    if summary.filter is not None:
        counts = summary.filter
        print(
            f"teacher filter: {counts['kept_first_time']} kept at once, {counts['kept_after_redraw']} after "
            f"a redraw, {counts['kept_failed']} kept although rejected, {counts['dropped']} dropped "
            f"({counts['redraws']} redraws)"
        )
    if summary.shards_redrawn:
        print(f"{summary.shards_redrawn} shards were cut short or corrupt and have been drawn again")
    if summary.shards_busy:
        print(
            f"{summary.shards_busy} shards are being written by another process right now and were left "
            "to it; rerun when it has finished to check the folder is complete"
        )
    if summary.peak_gpu_memory_gib is not None:
        print(f"peak GPU memory: {summary.peak_gpu_memory_gib:.2f} GiB")
    if not summary.complete:
        print("not every shard exists yet: other parts are still running or have not run; rerun to finish")
