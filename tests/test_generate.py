"""Stage 2 with the tiny random diffusion pipelines: shards, determinism, scale-out, resume, bad input."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

import synthdistill
from synthdistill.cli import main
from synthdistill.config import GenerateConfig
from synthdistill.errors import SynthdistillError
from synthdistill.fileio import exclusive_lock
from synthdistill.generate import (
    generate_images,
    load_text2image_pipeline,
    read_prompts,
    to_stored_pixels,
    unusable,
    work_part,
)
from synthdistill.identity import effective_lora, shards_settings
from synthdistill.runtime import DistEnv, derive_seed
from synthdistill.shards import ShardSamples, decode_image, list_shards, read_index
from synthdistill.tiny import create_tiny_diffusion_pipeline
from test_shards import filling_disk

NUM_PROMPTS = 10
SHARD_SIZE = 4  # 10 prompts -> shards of 4, 4, 2


def image_settings(config):
    """The shards' settings as generate records them on a CPU."""
    return shards_settings(config, "cpu")


def prompt_lines(n, seed_offset=0):
    return [
        {
            "class_index": i % 3,
            "class_name": f"class {i % 3}",
            "prompt": f"a photo of a class {i % 3}, a type of thing, number {i}",
            "seed": 1000 + seed_offset + i,
            "options": {"setting": "a table"},
            "generator": "template",
        }
        for i in range(n)
    ]


def write_prompts(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def tiny_config(**overrides):
    return GenerateConfig(
        **{"model": "tiny", "lora": None, "shard_size": SHARD_SIZE, "batch_size": 4, **overrides}
    )


def samples(out_dir):
    return ShardSamples(list_shards(out_dir))


def pixels(out_dir):
    """Every stored image of a folder as an int array, by sample key."""
    s = samples(out_dir)
    return {s[i].key: np.asarray(decode_image(s[i].image), dtype=np.int16) for i in range(len(s))}


def shard_bytes(out_dir):
    return {p.name: p.read_bytes() for p in list_shards(out_dir)}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", prompt_lines(NUM_PROMPTS))


@pytest.fixture(scope="module")
def reference(prompts_file, tmp_path_factory):
    """One uninterrupted single-process run over the module's prompts: (out_dir, summary)."""
    out_dir = tmp_path_factory.mktemp("reference") / "shards"
    return out_dir, generate_images(prompts_file, out_dir, tiny_config(), device="cpu")


def test_shards_hold_exactly_the_prompts_with_their_metadata(prompts_file, reference):
    out_dir, summary = reference
    assert (summary.images_written, summary.shards_written, summary.images_failed) == (10, 3, 0)
    assert summary.complete and summary.peak_gpu_memory_gib is None
    assert [p.name for p in list_shards(out_dir)] == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    index = read_index(out_dir)
    assert [s["count"] for s in index["shards"]] == [4, 4, 2]
    assert (index["total"], index["complete"], index["num_prompts"]) == (10, True, 10)

    s = samples(out_dir)
    assert [s.key(i) for i in range(len(s))] == [f"{i:08d}" for i in range(NUM_PROMPTS)]
    for i, line in enumerate(prompt_lines(NUM_PROMPTS)):
        meta = s[i].meta
        assert {k: meta[k] for k in ("class_index", "class_name", "prompt", "seed")} == {
            k: line[k] for k in ("class_index", "class_name", "prompt", "seed")
        }
        assert (meta["model"], meta["steps"], meta["guidance"], meta["retried"]) == ("tiny", 4, 1.0, False)
        assert decode_image(s[i].image).size == (64, 64)


def test_shards_are_readable_by_plain_webdataset(reference):
    out_dir, _ = reference
    dataset = wds.WebDataset([str(p) for p in list_shards(out_dir)], shardshuffle=False).decode("pil")
    plain = list(dataset)
    assert [s["__key__"] for s in plain] == [f"{i:08d}" for i in range(NUM_PROMPTS)]
    assert plain[3]["json"]["seed"] == 1003 and plain[3]["jpg"].size == (64, 64)


def test_same_prompts_and_seeds_give_identical_shards(prompts_file, reference, tmp_path):
    out_dir, _ = reference
    generate_images(prompts_file, tmp_path / "again", tiny_config(), device="cpu")
    assert shard_bytes(tmp_path / "again") == shard_bytes(out_dir)


def test_each_image_follows_its_prompts_seed(reference, tmp_path):
    out_dir, _ = reference
    reseeded = write_prompts(tmp_path / "reseeded.jsonl", prompt_lines(NUM_PROMPTS, seed_offset=1))
    generate_images(reseeded, tmp_path / "reseeded", tiny_config(shard_size=NUM_PROMPTS), device="cpu")
    before, after = pixels(out_dir), pixels(tmp_path / "reseeded")
    # line i now carries line i+1's seed: the image moves with the seed, whatever the prompt
    moved = [np.abs(before[f"{i + 1:08d}"] - after[f"{i:08d}"]).mean() for i in range(NUM_PROMPTS - 1)]
    kept = [np.abs(before[key] - after[key]).mean() for key in before]
    assert max(moved) < 0.5 * min(kept)


def test_batch_size_does_not_change_an_image(reference, prompts_file, tmp_path):
    """Per-image generators make each image independent of its batch. Batched CPU kernels round
    differently in the last float bit, which can flip a few 8-bit pixels by one level (a few levels
    after JPEG), far below the difference between two seeds (~40 levels on average)."""
    out_dir, _ = reference
    batched = pixels(out_dir)
    for batch_size in (1, 3):
        generate_images(
            prompts_file, tmp_path / f"b{batch_size}", tiny_config(batch_size=batch_size), device="cpu"
        )
        other = pixels(tmp_path / f"b{batch_size}")
        assert other.keys() == batched.keys()
        for key in batched:
            difference = np.abs(other[key] - batched[key])
            assert difference.max() <= 8 and difference.mean() < 0.1, (batch_size, key)
    seeds_apart = np.abs(batched["00000000"] - batched["00000001"]).mean()
    assert seeds_apart > 10


def test_two_ranks_write_disjoint_shards_whose_union_is_the_whole_run(
    prompts_file, reference, tmp_path, monkeypatch
):
    out_dir, _ = reference
    first = generate_images(prompts_file, tmp_path, tiny_config(), shard_index=0, num_shards=2, device="cpu")
    assert [p.name for p in list_shards(tmp_path)] == ["shard-000000.tar", "shard-000002.tar"]
    assert not first.complete and read_index(tmp_path)["complete"] is False
    # the second part as torchrun would launch it: rank 1 of 2
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    second = generate_images(prompts_file, tmp_path, tiny_config(), device="cpu")
    assert (second.shards_written, second.images_written, second.complete) == (1, 4, True)
    assert (first.images_written + second.images_written) == NUM_PROMPTS
    assert shard_bytes(tmp_path) == shard_bytes(out_dir)
    assert read_index(tmp_path)["total"] == NUM_PROMPTS


def test_interrupted_run_resumes_to_the_complete_duplicate_free_result(prompts_file, reference, tmp_path):
    out_dir, _ = reference
    with pytest.raises(KeyboardInterrupt):
        generate_images(prompts_file, tmp_path, tiny_config(), fail_after=6, device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "index.json",
        "shard-000000.json",
        "shard-000000.tar",
    ]
    assert read_index(tmp_path)["complete"] is False

    resumed = generate_images(prompts_file, tmp_path, tiny_config(), device="cpu")
    assert (resumed.shards_skipped, resumed.shards_written, resumed.images_written) == (1, 2, 6)
    keys = [samples(tmp_path).key(i) for i in range(len(samples(tmp_path)))]
    assert keys == [f"{i:08d}" for i in range(NUM_PROMPTS)]
    assert shard_bytes(tmp_path) == shard_bytes(out_dir)
    assert resumed.complete


def test_folder_of_another_prompts_file_or_settings_is_refused_unless_forced(tmp_path):
    old = write_prompts(tmp_path / "old.jsonl", prompt_lines(6))
    new = write_prompts(tmp_path / "new.jsonl", prompt_lines(3, seed_offset=50))
    out_dir = tmp_path / "shards"
    generate_images(old, out_dir, tiny_config(), device="cpu")
    before = shard_bytes(out_dir)

    with pytest.raises(SynthdistillError, match="prompts_sha256.*--force"):
        generate_images(new, out_dir, tiny_config(), device="cpu")
    with pytest.raises(SynthdistillError, match=r"changed: steps\)"):
        generate_images(old, out_dir, tiny_config(steps=2), device="cpu")
    assert shard_bytes(out_dir) == before

    generate_images(new, out_dir, tiny_config(), force=True, device="cpu")
    assert [p.name for p in list_shards(out_dir)] == ["shard-000000.tar"]
    assert [samples(out_dir)[i].meta["seed"] for i in range(3)] == [1050, 1051, 1052]
    assert read_index(out_dir)["prompts_sha256"] == read_prompts(new).sha256


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ("{not json", "not valid JSON"),
        ('{"class_index": 0, "class_name": "c", "prompt": "p"}', "'seed' is missing"),
        (
            '{"class_index": 0, "class_name": "c", "prompt": "p", "seed": "7"}',
            "'seed' is missing or not an integer",
        ),
        ('["a list"]', "not a JSON object"),
        ("", "not valid JSON"),
    ],
)
def test_malformed_line_is_named_and_nothing_is_written(tmp_path, bad_line, reason):
    lines = [json.dumps(line) for line in prompt_lines(3)]
    lines.insert(2, bad_line)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    with pytest.raises(SynthdistillError, match=f"Line 3 of .*{reason}"):
        generate_images(prompts, tmp_path / "shards", tiny_config(), device="cpu")
    assert not (tmp_path / "shards").exists()


def test_unknown_model_offline_is_one_sentence_and_writes_nothing(prompts_file, tmp_path):
    config = tiny_config(model="no-such-org/no-such-diffusion-model")
    with pytest.raises(
        SynthdistillError, match="generate.model 'no-such-org/no-such-diffusion-model'"
    ) as error:
        generate_images(prompts_file, tmp_path / "shards", config, device="cpu")
    assert "\n" not in str(error.value) and "local folder" in str(error.value)
    assert not (tmp_path / "shards").exists()


def test_sdxl_style_pipeline_from_a_local_folder(tmp_path):
    """Two text encoders, SDXL's size conditioning, loaded by AutoPipelineForText2Image from disk."""
    folder = tmp_path / "tiny-sdxl"
    create_tiny_diffusion_pipeline("tiny-sdxl").save_pretrained(folder)
    prompts = write_prompts(tmp_path / "prompts.jsonl", prompt_lines(3))
    config = tiny_config(model=str(folder), store_size=32)
    summary = generate_images(prompts, tmp_path / "shards", config, device="cpu")
    assert (summary.images_written, summary.images_failed) == (3, 0)
    s = samples(tmp_path / "shards")
    assert [s[i].meta["model"] for i in range(3)] == [str(folder)] * 3
    assert {decode_image(s[i].image).size for i in range(3)} == {(32, 32)}


def test_lora_is_fused_into_the_unet(prompts_file, reference, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = create_tiny_diffusion_pipeline("tiny").unet
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(unet)
    )

    lora_file = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    pipe = load_text2image_pipeline(tiny_config(lora=str(lora_file)), torch.device("cpu"))
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())
    generate_images(prompts_file, tmp_path / "shards", tiny_config(), device="cpu", pipeline=pipe)
    out_dir, _ = reference
    plain, with_lora = pixels(out_dir), pixels(tmp_path / "shards")
    assert min(np.abs(plain[key] - with_lora[key]).mean() for key in plain) > 1


def test_unusable_images_are_redrawn_once_then_counted_and_skipped(tmp_path):
    pipe = load_text2image_pipeline(tiny_config(), torch.device("cpu"))
    with torch.no_grad():  # a decoder that can only paint black
        pipe.vae.decoder.conv_out.weight.zero_()
        pipe.vae.decoder.conv_out.bias.fill_(-10.0)
    prompts = write_prompts(tmp_path / "prompts.jsonl", prompt_lines(3))
    summary = generate_images(prompts, tmp_path / "shards", tiny_config(), device="cpu", pipeline=pipe)
    assert (summary.images_written, summary.images_retried, summary.images_failed) == (0, 3, 3)
    assert read_index(tmp_path / "shards")["total"] == 0


class SeedPainter:
    """A stand-in text-to-image pipeline: a black image for the seeds in ``black``, grey otherwise."""

    def __init__(self, black):
        self.black = set(black)

    def __call__(self, prompt, generator, **kwargs):
        seeds = [g.initial_seed() for g in generator]
        images = torch.stack([torch.full((3, 16, 16), 0.0 if s in self.black else 0.5) for s in seeds])
        return types.SimpleNamespace(images=images)


def test_a_redrawn_image_records_its_new_seed(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", prompt_lines(3))
    painter = SeedPainter(black=[1001])
    summary = generate_images(prompts, tmp_path / "shards", tiny_config(), device="cpu", pipeline=painter)
    assert (summary.images_written, summary.images_retried, summary.images_failed) == (3, 1, 0)
    metas = [samples(tmp_path / "shards")[i].meta for i in range(3)]
    assert [(m["seed"], m["retried"]) for m in metas] == [
        (1000, False),
        (derive_seed(1001, "retry"), True),
        (1002, False),
    ]


def test_nan_and_black_images_are_unusable():
    images = torch.rand(3, 3, 8, 8)
    images[1] = 0.0
    images[2, 1, 2, 3] = float("nan")
    assert unusable(images).tolist() == [False, True, True]


def test_stored_images_shrink_to_store_size_on_the_short_side():
    images = torch.rand(2, 3, 64, 96)
    assert to_stored_pixels(images, 32).shape == (2, 32, 48, 3)
    assert to_stored_pixels(images, 256).shape == (2, 64, 96, 3)
    assert to_stored_pixels(images, None).dtype == np.uint8


def test_work_parts_combine_job_array_and_torchrun_ranks():
    assert work_part(None, None, DistEnv()) == (0, 1)
    assert work_part(3, 4, DistEnv(rank=1, local_rank=1, world_size=8)) == (25, 32)
    with pytest.raises(SynthdistillError, match="go together"):
        work_part(1, None, DistEnv())
    with pytest.raises(SynthdistillError, match="0..3"):
        work_part(4, 4, DistEnv())


def test_tiny_pipelines_have_the_same_weights_in_every_build():
    first, second = create_tiny_diffusion_pipeline("tiny"), create_tiny_diffusion_pipeline("tiny")
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        assert all(torch.equal(a[key], b[key]) for key in a), name


def test_cli_defaults_to_the_recipe_run_directory(prompts_file, reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(prompts_file, run_dir / "prompts.jsonl")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"run_dir: {run_dir}\ngenerate:\n  model: tiny\n  lora: null\n  shard_size: {SHARD_SIZE}\n"
    )
    assert main(["generate", "-c", str(recipe), "--batch-size", "4", "--device", "cpu"]) == 0
    assert "10 images" in capsys.readouterr().out
    out_dir, _ = reference
    assert shard_bytes(run_dir / "shards") == shard_bytes(out_dir)


def cli_command(prompts, out_dir):
    """The generate command a user would run for the module's reference settings (no --lora: the
    'auto' default must give the tiny model no LoRA, offline)."""
    return [
        sys.executable, "-m", "synthdistill", "generate", "--prompts", str(prompts), "--out", str(out_dir),
        "--model", "tiny", "--batch-size", "4", "--device", "cpu",
        "--set", f"generate.shard_size={SHARD_SIZE}",
    ]  # fmt: skip


def subprocess_env(**extra):
    src = str(Path(synthdistill.__file__).parents[1])
    path = os.pathsep.join([*extra.pop("first_on_path", []), src, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **extra}


def leftovers(out_dir):
    return sorted(p.name for p in out_dir.iterdir() if ".tmp-" in p.name or p.name.endswith(".lock"))


def test_broken_utf8_is_refused_with_file_and_line(tmp_path):
    lines = [json.dumps(line).encode() for line in prompt_lines(3)]
    lines[1] = lines[1].replace(b"class 1", b"class \xff1")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(SynthdistillError, match=f"Line 2 of '{prompts}' .*not valid UTF-8"):
        generate_images(prompts, tmp_path / "shards", tiny_config(), device="cpu")
    assert not (tmp_path / "shards").exists()


def test_the_lcm_lora_default_applies_to_the_default_sdxl_model_only():
    default = GenerateConfig()
    assert effective_lora(default.model, default.lora) == "latent-consistency/lcm-lora-sdxl"
    assert effective_lora("tiny", "auto") is None
    assert effective_lora("some/other-model", "auto") is None
    assert effective_lora("tiny", "/my/lora.safetensors") == "/my/lora.safetensors"
    assert image_settings(GenerateConfig(model="tiny"))["lora"] is None


def test_image_settings_are_exactly_the_settings_that_change_images():
    base = GenerateConfig(model="tiny", lora=None)
    assert set(image_settings(base)) == {
        "model", "lora", "vae", "scheduler", "steps", "guidance", "resolution", "negative_prompt",
        "store_size", "jpeg_quality", "precision", "prompt_weighting", "safety_checker", "shard_size",
        "filter",
    }  # fmt: skip
    for speed_only in ({"batch_size": 1}, {"compile": True}):
        assert image_settings(dataclasses.replace(base, **speed_only)) == image_settings(base)
    changes = {
        "model": "tiny-sdxl", "lora": "x.safetensors", "vae": "v", "scheduler": "default", "steps": 2,
        "guidance": 2.0, "resolution": 32, "negative_prompt": "blurry", "store_size": 32, "jpeg_quality": 90,
        "precision": "fp16", "prompt_weighting": "none", "safety_checker": True, "shard_size": 3,
        "filter": "teacher",
    }  # fmt: skip
    for key, value in changes.items():
        assert image_settings(dataclasses.replace(base, **{key: value})) != image_settings(base), key


def test_a_rerun_redraws_a_cut_short_and_a_corrupt_shard_to_the_same_bytes(prompts_file, reference, tmp_path):
    out_dir, _ = reference
    shutil.copytree(out_dir, tmp_path, dirs_exist_ok=True)
    cut = tmp_path / "shard-000001.tar"
    cut.write_bytes(cut.read_bytes()[:3000])
    corrupt = tmp_path / "shard-000002.tar"
    data = bytearray(corrupt.read_bytes())
    data[1500:1600] = bytes(100)  # inside the first image: same size, same sample count
    corrupt.write_bytes(bytes(data))

    summary = generate_images(prompts_file, tmp_path, tiny_config(), device="cpu")
    assert (summary.shards_redrawn, summary.shards_written, summary.shards_skipped) == (2, 2, 1)
    assert shard_bytes(tmp_path) == shard_bytes(out_dir)
    assert read_index(tmp_path) == read_index(out_dir)


def test_a_full_disk_is_one_sentence_and_leaves_no_partial_shard(
    prompts_file, reference, tmp_path, monkeypatch
):
    from synthdistill import shards

    out_dir, _ = reference
    first = (out_dir / "shard-000000.tar").stat().st_size
    monkeypatch.setattr(shards, "open", filling_disk(first + 4000), raising=False)  # room for one shard
    with pytest.raises(SynthdistillError, match=f"The disk holding '{tmp_path}' is full") as error:
        generate_images(prompts_file, tmp_path, tiny_config(), device="cpu")
    assert "\n" not in str(error.value)
    assert leftovers(tmp_path) == []
    assert [p.name for p in list_shards(tmp_path)] == ["shard-000000.tar"]
    monkeypatch.undo()
    generate_images(prompts_file, tmp_path, tiny_config(), device="cpu")
    assert shard_bytes(tmp_path) == shard_bytes(out_dir)


@pytest.mark.slow
def test_a_second_process_leaves_a_shard_being_written_to_its_writer(prompts_file, reference, tmp_path):
    out_dir, _ = reference
    with exclusive_lock(tmp_path / ".shard-000000.lock", "shard shard-000000.tar"):  # this process writes it
        result = subprocess.run(
            cli_command(prompts_file, tmp_path),
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "1 shards are being written by another process" in result.stdout
        assert [p.name for p in list_shards(tmp_path)] == ["shard-000001.tar", "shard-000002.tar"]
        assert read_index(tmp_path)["complete"] is False
    summary = generate_images(prompts_file, tmp_path, tiny_config(), device="cpu")
    assert (summary.shards_written, summary.shards_skipped, summary.complete) == (1, 2, True)
    assert shard_bytes(tmp_path) == shard_bytes(out_dir)
    assert leftovers(tmp_path) == []


KILLER = """
import os, signal
from synthdistill import shards
point = os.environ["SYNTHDISTILL_TEST_KILL"]
if point == "mid-shard":
    _write = shards.ShardWriter.write
    def write(self, key, files):
        _write(self, key, files)
        if key == "00000005":  # the second image of shard 1
            os.kill(os.getpid(), signal.SIGKILL)
    shards.ShardWriter.write = write
else:  # between the shard's record and its rename
    _record = shards.atomic_write_json
    def atomic_write_json(path, value):
        _record(path, value)
        if path.name == "shard-000001.json":
            os.kill(os.getpid(), signal.SIGKILL)
    shards.atomic_write_json = atomic_write_json
"""


@pytest.mark.slow
@pytest.mark.parametrize("point", ["mid-shard", "before-rename"])
def test_a_killed_run_resumes_to_identical_shards_and_leaves_nothing_behind(
    prompts_file, reference, tmp_path, point
):
    out_dir, _ = reference
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILLER)
    shards_dir = tmp_path / "shards"
    env = subprocess_env(first_on_path=[str(hooks)], SYNTHDISTILL_TEST_KILL=point)
    killed = subprocess.run(cli_command(prompts_file, shards_dir), env=env, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert leftovers(shards_dir)  # the killed writer's temporary shard, and its lock file
    resumed = subprocess.run(
        cli_command(prompts_file, shards_dir),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert shard_bytes(shards_dir) == shard_bytes(out_dir)
    assert read_index(shards_dir) == read_index(out_dir)
    assert leftovers(shards_dir) == []
