"""Images/s of stage 2 at batch sizes 1, 4 and 16, side by side in one run.

Times the whole of ``generate_images`` (drawing, JPEG encoding, shard writing) with one loaded
pipeline, after a warm-up batch at each size::

    python benchmarks/bench_generate.py                       # tiny model, CPU or the GPU
    python benchmarks/bench_generate.py --model sdxl-shaped --device cuda --images 64

``--model`` takes any generate.model value (hub id, local folder, tiny, tiny-sdxl) or
``sdxl-shaped``: SDXL base's architecture at full size with random weights, built on the device,
so a GPU without network access measures the throughput SDXL would have (random weights can
overflow in fp16: the retried column shows how many images were drawn twice).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from synthdistill.config import GenerateConfig
from synthdistill.generate import generate_images, load_text2image_pipeline, pipeline_dtype
from synthdistill.runtime import resolve_device
from synthdistill.tiny import create_tiny_clip_tokenizer

SDXL_SHAPED = "sdxl-shaped"


def create_sdxl_shaped_pipeline(device: torch.device, dtype: torch.dtype):
    """SDXL base 1.0's components (published configs) with random weights, initialised on ``device``."""
    from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = create_tiny_clip_tokenizer()  # CLIP's real BPE vocabulary, as SDXL uses
    text = {
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 77,
        "eos_token_id": tokenizer.eos_token_id,
    }
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=1024,
            scaling_factor=0.13025,
            force_upcast=True,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, **text
            )
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=20,
                projection_dim=1280,
                hidden_act="gelu",
                **text,
            )
        )
    scheduler = LCMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.to(dtype=dtype)
    if device.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_prompts(path: Path, count: int) -> Path:
    lines = [
        {
            "class_index": i % 37,
            "class_name": f"class {i % 37}",
            "seed": i,
            "prompt": f"a photo of class {i % 37}",
        }
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help=f"generate.model value, or '{SDXL_SHAPED}'.")
    parser.add_argument("--lora", default=None, help="LoRA fused into the UNet (default: none).")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=64, help="Images timed per batch size.")
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=None, help="Image side; default: the model's.")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet.")
    args = parser.parse_args()

    device = resolve_device(args.device)
    config = GenerateConfig(
        model=args.model,
        lora=args.lora,
        steps=args.steps,
        resolution=args.resolution,
        precision=args.precision,
        compile=args.compile,
    )
    if args.model == SDXL_SHAPED:
        pipe = create_sdxl_shaped_pipeline(device, pipeline_dtype(args.precision, device))
        if args.compile:
            pipe.unet = torch.compile(pipe.unet)
    else:
        pipe = load_text2image_pipeline(config, device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    size = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    print(
        f"{args.model} on {device} ({pipe.dtype}), {config.steps} steps, {size} px, "
        f"{args.images} images per batch size"
    )
    relative = f"vs batch {batch_sizes[0]}"
    print(f"{'batch':>5}  {'images/s':>9}  {relative:>11}  {'retried':>7}  {'peak GPU GiB':>12}")
    baseline = None
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        prompts = write_prompts(folder / "prompts.jsonl", args.images)
        for batch_size in batch_sizes:
            run = dataclasses.replace(config, batch_size=batch_size, shard_size=args.images)
            warmup = write_prompts(folder / f"warmup-{batch_size}.jsonl", batch_size)
            generate_images(warmup, folder / f"warmup-{batch_size}", run, device=str(device), pipeline=pipe)
            summary = generate_images(
                prompts, folder / f"b{batch_size}", run, device=str(device), pipeline=pipe
            )
            baseline = baseline or summary.images_per_second
            peak = "-" if summary.peak_gpu_memory_gib is None else f"{summary.peak_gpu_memory_gib:.1f}"
            print(
                f"{batch_size:>5}  {summary.images_per_second:>9.2f}  "
                f"{summary.images_per_second / baseline:>10.2f}x  {summary.images_retried:>7}  {peak:>12}"
            )


if __name__ == "__main__":
    main()
