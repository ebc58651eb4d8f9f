"""Output identities: a speed-only setting never invalidates an output, a result setting always does."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from synthdistill import identity
from synthdistill.config import STAGES, load_recipe
from synthdistill.pipeline import stage_identities
from synthdistill.registry import resolve_domain

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"

SPEED_ONLY = {
    "prompts": set(),
    "generate": {"batch_size", "compile"},
    "distill": {
        *("compile", "workers", "checkpoint_every", "log_every", "input"),
        *("validate_every", "validate_protocol", "keep_checkpoints"),  # the student is the same
    },
    "evaluate": {"batch_size", "workers", "download", "precision", "head_cache"},
    "export": {"bench_repeats", "bench_seconds", "bench_threads", "cache_dir"},
}
"""What the issue names speed-only; the config marks must say exactly this (a new key must be decided)."""

UNREAD = {
    ("prompts", "template"): set(identity.LLM_SETTINGS),
    ("distill", "no train_data"): set(identity.STREAM_SETTINGS),
    ("generate", "filter none"): set(identity.FILTER_SETTINGS),
}


def smoke(*overrides: str):
    recipe = load_recipe(SMOKE, list(overrides))
    return recipe, resolve_domain(recipe.dataset, recipe.classes_file, recipe.superclass)


def other_value(f: dataclasses.Field, current):
    """A valid value different from ``current`` for a config field."""
    choices = f.metadata.get("choices")
    if choices:
        if isinstance(current, list):
            return [next(c for c in reversed(choices) if [c] != current)]
        return next(c for c in reversed(choices) if c != current)  # 'fp16', not 'fp32' = auto on CPU
    if isinstance(current, bool):
        return not current
    if isinstance(current, int):
        return current - 1 if f.metadata.get("bounds", "").endswith("100]") else current + 1
    if isinstance(current, float):
        return current / 2 if current else 0.5
    if isinstance(current, list):
        return ["pets"]
    if current is None:
        annotation = str(f.type)
        return 2 if "int" in annotation else 0.5 if "float" in annotation else "other"
    return f"{current}-other"


def fields_of(stage: str, hashed: bool):
    recipe, _ = smoke()
    return [f for f in dataclasses.fields(getattr(recipe, stage)) if f.metadata.get("hashed", True) is hashed]


def test_the_speed_only_settings_are_exactly_the_marked_ones():
    assert {stage: {f.name for f in fields_of(stage, hashed=False)} for stage in STAGES} == SPEED_ONLY


@pytest.mark.parametrize(
    "stage,name", [(stage, name) for stage, names in SPEED_ONLY.items() for name in sorted(names)]
)
def test_a_speed_only_setting_changes_no_identity(stage, name):
    recipe, domain = smoke()
    before = stage_identities(recipe, domain, "cpu")
    f = next(f for f in dataclasses.fields(getattr(recipe, stage)) if f.name == name)
    setattr(getattr(recipe, stage), name, other_value(f, getattr(getattr(recipe, stage), name)))
    assert stage_identities(recipe, domain, "cpu") == before


def _result_settings():
    for stage in STAGES:
        for f in fields_of(stage, hashed=True):
            unread = set().union(*(names for (section, _), names in UNREAD.items() if section == stage))
            if f.name not in unread:
                yield stage, f.name


@pytest.mark.parametrize("stage,name", list(_result_settings()))
def test_a_result_setting_changes_its_identity_and_every_downstream_one(stage, name):
    recipe, domain = smoke()
    before = stage_identities(recipe, domain, "cpu")
    f = next(f for f in dataclasses.fields(getattr(recipe, stage)) if f.name == name)
    setattr(getattr(recipe, stage), name, other_value(f, getattr(getattr(recipe, stage), name)))
    after = stage_identities(recipe, domain, "cpu")
    first = STAGES.index(stage)
    assert all(after[s] == before[s] for s in STAGES[:first])
    changed = [s for s in STAGES[first:] if after[s] != before[s]]
    assert changed == list(STAGES[first:])


@pytest.mark.parametrize("generator", identity.LLM_GENERATORS)
@pytest.mark.parametrize("name", identity.LLM_SETTINGS)
def test_llm_settings_count_only_for_the_llm_generators(name, generator):
    recipe, domain = smoke()
    f = next(f for f in dataclasses.fields(recipe.prompts) if f.name == name)
    template = identity.prompts_identity(domain, recipe.prompts, 0, "cpu")
    setattr(recipe.prompts, name, other_value(f, getattr(recipe.prompts, name)))
    assert identity.prompts_identity(domain, recipe.prompts, 0, "cpu") == template
    recipe.prompts.generator = generator
    llm = identity.prompts_identity(domain, recipe.prompts, 0, "cpu")
    setattr(recipe.prompts, name, other_value(f, getattr(recipe.prompts, name)))
    assert identity.prompts_identity(domain, recipe.prompts, 0, "cpu") != llm


def test_the_registry_wording_of_prompts_counts_for_the_prompts():
    recipe, domain = smoke()
    before = identity.prompts_identity(domain, recipe.prompts, 0, "cpu")
    reworded = dataclasses.replace(domain, prompt_template="A photo of a {c}+++ , {d1}, {d2}, {d3}, {d4}")
    assert identity.prompts_identity(reworded, recipe.prompts, 0, "cpu") != before


@pytest.mark.parametrize("name", identity.FILTER_SETTINGS)
def test_filter_settings_count_only_with_the_filter_on(name):
    recipe, domain = smoke()
    f = next(f for f in dataclasses.fields(recipe.generate) if f.name == name)
    off = stage_identities(recipe, domain, "cpu")["generate"]
    setattr(recipe.generate, name, other_value(f, getattr(recipe.generate, name)))
    assert stage_identities(recipe, domain, "cpu")["generate"] == off
    recipe.generate.filter = "teacher"
    on = stage_identities(recipe, domain, "cpu")["generate"]
    setattr(recipe.generate, name, other_value(f, getattr(recipe.generate, name)))
    assert stage_identities(recipe, domain, "cpu")["generate"] != on


@pytest.mark.parametrize("name", identity.STREAM_SETTINGS)
def test_streaming_settings_count_only_with_train_data(name):
    recipe, _ = smoke()
    f = next(f for f in dataclasses.fields(recipe.distill) if f.name == name)
    shards = identity.student_identity("shards", recipe.distill, 0, "cpu")
    setattr(recipe.distill, name, other_value(f, getattr(recipe.distill, name)))
    assert identity.student_identity("shards", recipe.distill, 0, "cpu") == shards
    recipe.distill.train_data = "/data/{000..009}.tar"
    streamed = identity.student_identity(recipe.distill.train_data, recipe.distill, 0, "cpu")
    setattr(recipe.distill, name, other_value(f, getattr(recipe.distill, name)))
    assert identity.student_identity(recipe.distill.train_data, recipe.distill, 0, "cpu") != streamed


def test_the_run_seed_and_the_classes_change_every_identity():
    recipe, domain = smoke()
    before = stage_identities(recipe, domain, "cpu")
    recipe.seed = 1
    reseeded = stage_identities(recipe, domain, "cpu")
    assert all(reseeded[s] != before[s] for s in STAGES)
    recipe.seed = 0
    fewer = stage_identities(recipe, dataclasses.replace(domain, classnames=domain.classnames[:-1]), "cpu")
    assert all(fewer[s] != before[s] for s in STAGES)


def test_auto_precision_counts_as_what_it_runs_as():
    recipe, domain = smoke()
    auto = stage_identities(recipe, domain, "cpu")
    recipe.generate.precision = recipe.distill.precision = "fp32"
    assert stage_identities(recipe, domain, "cpu") == auto  # auto is fp32 on a CPU
    assert stage_identities(recipe, domain, "cuda") == auto  # explicit: the device does not matter
    recipe.generate.precision = recipe.distill.precision = "auto"
    on_gpu = stage_identities(recipe, domain, "cuda")
    assert on_gpu["prompts"] == auto["prompts"] and on_gpu["generate"] != auto["generate"]


def write(path: Path, data: bytes, mtime_ns: int) -> None:
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_local_weights_file_counts_by_content(tmp_path):
    weights = tmp_path / "teacher.safetensors"
    write(weights, b"weights one", 1_000_000_000)
    recipe, domain = smoke(f"distill.teacher_pretrained={weights}")
    first = stage_identities(recipe, domain, "cpu")
    write(weights, b"weights two", 2_000_000_000)  # same name, same size, other content
    second = stage_identities(recipe, domain, "cpu")
    assert first["generate"] == second["generate"]
    assert all(first[s] != second[s] for s in ("distill", "evaluate", "export"))
    moved = tmp_path / "copy.safetensors"
    write(moved, b"weights two", 3_000_000_000)  # the same content elsewhere is the same weights
    assert identity.weights_identity(str(moved)) == identity.weights_identity(str(weights))
    assert identity.weights_identity("datacomp_xl_s13b_b90k") == "datacomp_xl_s13b_b90k"


def test_a_local_model_folder_counts_by_content(tmp_path):
    folder = tmp_path / "sdxl"
    (folder / "unet").mkdir(parents=True)
    write(folder / "unet" / "model.safetensors", b"unet", 1_000_000_000)
    recipe, _ = smoke(f"generate.model={folder}")
    before = identity.shards_identity("p", recipe.generate, "cpu")
    write(folder / "unet" / "model.safetensors", b"UNET", 2_000_000_000)
    assert identity.shards_identity("p", recipe.generate, "cpu") != before


def test_a_weights_file_is_read_once_per_process_while_unchanged(tmp_path, monkeypatch):
    weights = tmp_path / "big.bin"
    write(weights, b"x" * 1000, 1_000_000_000)
    opened = []

    def counting_open(path, *args, **kwargs):
        opened.append(path)
        return open(path, *args, **kwargs)  # noqa: SIM115 (the caller closes it)

    monkeypatch.setattr(identity, "open", counting_open, raising=False)
    first = identity.file_digest(weights)
    assert identity.file_digest(weights) == first and len(opened) == 1
    write(weights, b"y" * 1000, 2_000_000_000)
    assert identity.file_digest(weights) != first and len(opened) == 2


TEACHER_CACHE_ARGS = {
    "teacher": "ViT-B-32",
    "teacher_pretrained": "datacomp_xl_s13b_b90k",
    "preprocessing": {"image_size": 224, "interpolation": "bicubic"},
    "precision": "fp32",
    "augmentation": {"seed": 0, "scale_min": 0.9},
    "views": 8,
    "shards": "abc",
    "dtype": "fp16",
}


@pytest.mark.parametrize("changed", sorted(TEACHER_CACHE_ARGS))
def test_the_teacher_cache_identity_covers_each_of_its_inputs(changed):
    base = identity.teacher_cache_identity(**TEACHER_CACHE_ARGS)
    value = TEACHER_CACHE_ARGS[changed]
    other = {**value, "extra": 1} if isinstance(value, dict) else value + 1 if isinstance(value, int) else "x"
    assert identity.teacher_cache_identity(**{**TEACHER_CACHE_ARGS, changed: other}) != base


def test_the_zero_shot_head_identity_follows_weights_classes_templates_and_label(tmp_path):
    weights = tmp_path / "w.pt"
    write(weights, b"one", 1_000_000_000)
    args = ("ViT-B-32", str(weights), ["cat", "dog"], ["a photo of a {c}."], "head")
    base = identity.zero_shot_head_identity(*args)
    assert identity.zero_shot_head_identity(*args) == base
    assert identity.zero_shot_head_identity("ViT-B-16", *args[1:]) != base
    assert identity.zero_shot_head_identity(*args[:2], ["dog", "cat"], *args[3:]) != base
    assert identity.zero_shot_head_identity(*args[:3], ["a {c}."], "head") != base
    assert identity.zero_shot_head_identity(*args[:4], "pets") != base
    write(weights, b"two", 2_000_000_000)
    assert identity.zero_shot_head_identity(*args) != base


def test_checkpoint_and_llm_progress_identities_follow_their_inputs():
    recipe, domain = smoke()
    student = identity.student_identity("shards", recipe.distill, 0, "cpu")
    one = identity.checkpoint_identity(student, "shards on 1 processes")
    assert one != identity.checkpoint_identity(student, "shards on 2 processes")
    recipe.distill.workers = 9
    assert (
        identity.checkpoint_identity(
            identity.student_identity("shards", recipe.distill, 0, "cpu"), "shards on 1 processes"
        )
        == one
    )
    recipe.prompts.generator = "llm"
    progress = identity.llm_progress_identity(domain, recipe.prompts, 0, "cpu", 1)
    assert progress != identity.llm_progress_identity(domain, recipe.prompts, 0, "cpu", 2)
    assert progress != identity.llm_progress_identity(domain, recipe.prompts, 1, "cpu", 1)


def test_folder_inputs_count_by_content(tmp_path):
    from synthdistill.shards import ShardWriter

    for index in range(2):
        with ShardWriter(tmp_path / "shards" / f"shard-{index:06d}.tar") as writer:
            writer.write(f"{index:08d}", {"json": b"{}"})
    first = identity.shards_folder_identity(tmp_path / "shards")
    (tmp_path / "shards" / "index.json").write_text("{}")  # the index is not the images
    assert identity.shards_folder_identity(tmp_path / "shards") == first
    with ShardWriter(tmp_path / "shards" / "shard-000001.tar") as writer:
        writer.write("00000001", {"json": b'{"a": 1}'})
    assert identity.shards_folder_identity(tmp_path / "shards") != first

    student = tmp_path / "student"
    student.mkdir()
    (student / "model.safetensors").write_bytes(b"w")
    (student / "config.json").write_text("{}")
    before = identity.student_folder_identity(student)
    (student / "train_log.jsonl").write_text("{}\n")
    assert identity.student_folder_identity(student) == before
    (student / "config.json").write_text('{"teacher": "other"}')
    assert identity.student_folder_identity(student) != before


def test_digest_is_stable_and_refuses_values_without_a_stable_text():
    assert identity.digest({"b": 1, "a": (1, 2)}) == identity.digest({"a": [1, 2], "b": 1})
    assert identity.digest(Path("x")) == identity.digest("x")
    with pytest.raises(TypeError, match="no stable identity"):
        identity.digest(object())


def test_a_safetensors_file_counts_by_its_tensors_and_metadata_not_its_header_order(tmp_path):
    import json
    import struct

    data = b"\x00" * 8
    headers = [
        {
            "__metadata__": {"format": "pt", "synthdistill": "student"},
            "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        },
        {
            "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "__metadata__": {"synthdistill": "student", "format": "pt"},
        },
    ]
    paths = []
    for index, header in enumerate(headers):
        text = json.dumps(header).encode("utf-8")
        paths.append(tmp_path / f"model{index}.safetensors")
        paths[-1].write_bytes(struct.pack("<Q", len(text)) + text + data)
    assert paths[0].read_bytes() != paths[1].read_bytes()
    assert identity.file_digest(paths[0]) == identity.file_digest(paths[1])
    text = json.dumps(headers[0]).encode("utf-8")
    write(paths[1], struct.pack("<Q", len(text)) + text + b"\x01" * 8, 2_000_000_000)
    assert identity.file_digest(paths[0]) != identity.file_digest(paths[1])
