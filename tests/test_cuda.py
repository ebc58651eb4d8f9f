"""CUDA-only checks (``pytest -m cuda``; skipped without a GPU): bf16 distillation, fused AdamW,
DDP over NCCL, export of a CUDA-trained student, SDXL-shaped fp16 generation, a Llama-shaped bf16
chat model, streamed JPEGs decoded with nvjpeg. Random weights of the real architectures: no
download. ``benchmarks/gpu_check.py`` runs them."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def tiny_cuda_config(**overrides):
    from test_distill import tiny_config

    return tiny_config(precision="bf16", workers=0, **overrides)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, write_shards):
    return write_shards(tmp_path_factory.mktemp("cuda") / "shards", 96, shard_size=48)


def test_bf16_distill_steps_learn_on_the_gpu(tmp_path, shards):
    from synthdistill.train import distill_student
    from test_distill import losses

    for source in ("decoded", "workers"):
        out = tmp_path / source / "student"
        summary = distill_student(shards, out, tiny_cuda_config(epochs=6, input=source), device="cuda")
        logged = losses(out)
        assert summary.completed and all(torch.isfinite(torch.tensor(logged)))
        assert logged[-1] < logged[0] / 2


def test_fused_adamw_matches_the_unfused_step():
    from synthdistill.config import DistillConfig
    from synthdistill.train.optim import make_optimizer

    torch.manual_seed(0)
    models = [torch.nn.Linear(64, 32).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    c = DistillConfig()
    fused = make_optimizer(models[0], c.lr, c.weight_decay, c.betas, c.eps, torch.device("cuda"))
    plain = make_optimizer(models[1], c.lr, c.weight_decay, c.betas, c.eps, torch.device("cpu"))
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    x = torch.randn(16, 64, device="cuda")
    for model, optimizer in zip(models, (fused, plain), strict=True):
        model(x).square().mean().backward()
        optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_ddp_over_nccl_on_one_process():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 4).cuda(), device_ids=[0])
        model(torch.randn(4, 8, device="cuda")).sum().backward()
        flag = torch.ones(1, device="cuda")
        dist.all_reduce(flag)
        assert flag.item() == 1 and model.module.weight.grad is not None
    finally:
        dist.destroy_process_group()


def test_export_of_a_cuda_trained_student_matches_pytorch(tmp_path, shards):
    from synthdistill.config import ExportConfig
    from synthdistill.deploy.export import export_student
    from synthdistill.registry import domain_from_classes
    from synthdistill.train import distill_student

    out = tmp_path / "student"
    distill_student(shards, out, tiny_cuda_config(epochs=1), device="cuda")
    summary = export_student(
        out, domain_from_classes(["a", "b", "c"]), tmp_path / "export", ExportConfig(bench=False)
    )
    assert (tmp_path / "export" / "model.onnx").is_file()
    assert summary is not None  # export_student checks the ONNX model against PyTorch (export.atol)


def test_sdxl_shaped_fp16_generation_with_fp32_vae_decode():
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from bench_generate import create_sdxl_shaped_pipeline

    pipe = create_sdxl_shaped_pipeline(torch.device("cuda"), torch.float16)
    assert pipe.unet.dtype == torch.float16
    pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16: decoded in fp32
    generator = torch.Generator("cuda").manual_seed(0)
    images = pipe("a photo of a cat", num_inference_steps=2, guidance_scale=1.0, output_type="pt",
                  generator=generator).images  # fmt: skip
    assert images.shape == (1, 3, 1024, 1024)
    del pipe
    torch.cuda.empty_cache()


def test_llama_shaped_bf16_chat_model_generates_tokens():
    from transformers import LlamaConfig, LlamaForCausalLM

    from synthdistill.tiny import create_tiny_llm_tokenizer

    tokenizer = create_tiny_llm_tokenizer()
    config = LlamaConfig(  # Llama-2 7B's shape but for the vocabulary (the tiny byte tokenizer's)
        vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, max_position_embeddings=4096,
    )  # fmt: skip
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Where could a photo of a cat be taken?"}], tokenize=False
    )
    inputs = tokenizer([text], return_tensors="pt").to("cuda")
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert output.shape[1] == inputs["input_ids"].shape[1] + 8
    del model
    torch.cuda.empty_cache()


def test_streamed_jpegs_decode_with_nvjpeg_as_on_the_cpu(tmp_path, make_blob):
    from synthdistill.data.encoded import EncodedImages, decode_crops
    from synthdistill.shards import ShardWriter
    from synthdistill.train import distill_student
    from test_distill import losses
    from test_stream_decode import encoded

    files = [encoded(make_blob(i, 96), "JPEG") for i in range(6)] + [
        encoded(make_blob(6, 96), "PNG"),
        b"junk",
    ]
    images = EncodedImages.of(files, [(i, 2 * i, 40 + 3 * i, 60 - 2 * i) for i in range(len(files))])
    on_gpu, kept = decode_crops(images, 64, "bicubic", torch.device("cuda"))
    on_cpu, kept_on_cpu = decode_crops(images, 64, "bicubic", torch.device("cpu"))
    assert kept == kept_on_cpu == list(range(7)) and on_gpu.device.type == "cuda"  # the PNG on the CPU
    # nvjpeg's IDCT and chroma upsampling differ from libjpeg's by a grey level here and there
    assert (on_gpu.cpu().int() - on_cpu.int()).abs().float().mean() < 1.5

    for shard in range(2):
        with ShardWriter(tmp_path / f"web-{shard}.tar") as writer:
            for i in range(16):
                writer.write(f"s{shard}-{i}", {"jpg": encoded(make_blob(16 * shard + i, 80), "JPEG")})
    out = tmp_path / "student"
    config = tiny_cuda_config(
        train_data=str(tmp_path / "web-{0..1}.tar"), train_num_samples=32, stream_decode="device", epochs=2
    )
    summary = distill_student(None, out, config, device="cuda")
    assert summary.completed and summary.input == "stream-device-decode" and summary.corrupt_samples == 0
    assert all(torch.isfinite(torch.tensor(losses(out))))
