"""Export: every format reproduces PyTorch, open_clip loads the student as a CLIP, the model card adds up."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from synthdistill.cli import main
from synthdistill.config import ExportConfig
from synthdistill.errors import SynthdistillError
from synthdistill.export import (
    CARD_NAME,
    OPEN_CLIP_DIR,
    OPEN_CLIP_WEIGHTS,
    TORCHSCRIPT_INFO,
    build_classifier,
    count_flops,
    export_student,
)
from synthdistill.predict import EXPORT_FORMAT_VERSION, LABELS_NAME
from synthdistill.student import create_student, load_student, save_student
from synthdistill.teacher import load_teacher


@pytest.fixture(scope="module")
def classifier(tiny_export):
    """The PyTorch reference the exports must reproduce."""
    return build_classifier(tiny_export.student_dir, tiny_export.domain)[0]


def random_batch(batch_size: int, seed: int = 123) -> torch.Tensor:
    return torch.rand(batch_size, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def assert_matches(classifier, images, logits, embedding):
    with torch.inference_mode():
        want_logits, want_embedding = classifier(images)
    assert logits.shape == (images.shape[0], 5) and embedding.shape == (images.shape[0], 32)
    assert torch.allclose(torch.as_tensor(embedding), want_embedding, atol=1e-4, rtol=0)
    assert torch.allclose(torch.as_tensor(logits) / 100, want_logits / 100, atol=1e-4, rtol=0)
    assert torch.allclose(torch.as_tensor(embedding).norm(dim=-1), torch.ones(images.shape[0]), atol=1e-5)


def test_onnx_matches_pytorch_at_a_new_batch_size(tiny_export, classifier):
    path = tiny_export.out_dir / "model.onnx"
    model = onnx.load(str(path))
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits", "embedding"]
    images = random_batch(5)
    logits, embedding = session.run(None, {"images": images.numpy()})
    assert_matches(classifier, images, torch.from_numpy(logits), torch.from_numpy(embedding))


def test_onnx_metadata_and_labels_json_describe_the_model(tiny_export):
    props = {
        p.key: json.loads(p.value) for p in onnx.load(str(tiny_export.out_dir / "model.onnx")).metadata_props
    }
    labels = json.loads((tiny_export.out_dir / LABELS_NAME).read_text())
    assert props == labels
    assert labels["classnames"] == list(tiny_export.domain.classnames)
    assert labels["synthdistill_format_version"] == EXPORT_FORMAT_VERSION
    assert labels["preprocessing"]["image_size"] == 64
    assert labels["preprocessing"]["resize_mode"] == "shortest"
    assert labels["preprocessing"]["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_torchscript_matches_pytorch(tiny_export, classifier):
    extra = {TORCHSCRIPT_INFO: ""}
    module = torch.jit.load(str(tiny_export.out_dir / "model.torchscript.pt"), _extra_files=extra)
    images = random_batch(4, seed=7)
    with torch.inference_mode():
        logits, embedding = module(images)
    assert_matches(classifier, images, logits, embedding)
    assert json.loads(extra[TORCHSCRIPT_INFO])["classnames"] == list(tiny_export.domain.classnames)


def test_open_clip_loads_the_student_as_image_tower_beside_the_teacher_text_tower(tiny_export, classifier):
    import open_clip

    folder = tiny_export.out_dir / OPEN_CLIP_DIR
    (config_file,) = [p for p in folder.glob("*.json") if p.name != "open_clip_config.json"]
    open_clip.add_model_config(config_file)
    clip, _, preprocess = open_clip.create_model_and_transforms(
        config_file.stem, pretrained=str(folder / OPEN_CLIP_WEIGHTS)
    )
    clip.eval()
    teacher = load_teacher("tiny")
    student = load_student(tiny_export.student_dir)
    images = random_batch(3, seed=5)
    texts = ["a photo of a lighthouse.", "a blurry photo of a cat."]
    with torch.inference_mode():
        assert torch.allclose(clip.encode_image(images, normalize=True), student(images), atol=1e-5)
        tokens = open_clip.get_tokenizer(config_file.stem)(texts)
        assert torch.allclose(
            clip.encode_text(tokens, normalize=True), teacher.encode_texts(texts), atol=1e-5
        )
    assert clip.visual.image_size == (64, 64)


def test_open_clip_zero_shot_head_reproduces_the_onnx_logits(tiny_export):
    """Through local-dir: (config + preprocessing travel along) and open_clip's own zero-shot builder."""
    import open_clip
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    name = f"local-dir:{tiny_export.out_dir / OPEN_CLIP_DIR}"
    clip, _, _ = open_clip.create_model_and_transforms(name)
    clip.eval()
    assert tuple(clip.visual.preprocess_cfg["mean"]) == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    domain = tiny_export.domain
    templates = [lambda c, t=template: t.format(c=c) for template in domain.templates]
    head = build_zero_shot_classifier(
        clip, open_clip.get_tokenizer(name), domain.classnames, templates, device="cpu"
    )
    images = random_batch(4, seed=11)
    mean = torch.tensor(clip.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(clip.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    with torch.inference_mode():
        logits = 100 * clip.encode_image((images - mean) / std, normalize=True) @ head
    session = ort.InferenceSession(
        str(tiny_export.out_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    onnx_logits = session.run(["logits"], {"images": images.numpy()})[0]
    np.testing.assert_allclose(logits.numpy() / 100, onnx_logits / 100, atol=1e-4)


def tiny_teacher_image_flops() -> int:
    """FLOPs of the tiny CLIP's image tower (tiny_configs: 64 px, patch 16, width 64, 2 layers,
    MLP ratio 4, embed 32) for one image, counted by hand: a multiply-add is 2 FLOPs."""
    width, tokens, patches, layers = 64, 17, 16, 2
    patch_embed = patches * (3 * 16 * 16) * width
    per_layer = tokens * (4 * width * width + 2 * width * 4 * width) + 2 * tokens * tokens * width
    return 2 * (patch_embed + layers * per_layer + width * 32)


def card_row(card: str, first_cell: str) -> str:
    (row,) = [line for line in card.splitlines() if line.startswith(f"| {first_cell}")]
    return row


def test_model_card_lists_parameters_flops_and_latency_of_student_and_teacher(tiny_export):
    summary = tiny_export.summary
    card = (tiny_export.out_dir / CARD_NAME).read_text()
    student = load_student(tiny_export.student_dir)
    assert summary.student_parameters == sum(p.numel() for p in student.parameters())
    assert summary.teacher_parameters == sum(
        p.numel() for p in load_teacher("tiny").model.visual.parameters()
    )
    assert summary.teacher_flops == tiny_teacher_image_flops()
    assert summary.student_flops == count_flops(student, torch.zeros(1, 3, 64, 64)) > 0
    student_row, teacher_row = card_row(card, "student `"), card_row(card, "teacher `")
    assert (
        f"{summary.student_parameters:,}" in student_row
        and f"{summary.student_flops / 1e9:.4g}" in student_row
    )
    assert (
        f"{summary.teacher_parameters:,}" in teacher_row
        and f"{summary.teacher_flops / 1e9:.4g}" in teacher_row
    )

    for model in ("student", "teacher"):
        timings = re.findall(r"([\d.]+) \(([\d.]+)\)", card_row(card, f"{model} |"))
        assert len(timings) == 2 and all(float(ms) > 0 and float(rate) > 0 for ms, rate in timings)
    assert sorted((row.model, row.batch_size) for row in summary.latency) == [
        ("student", 1),
        ("student", 32),
        ("teacher", 1),
        ("teacher", 32),
    ]
    assert f"{os.cpu_count()} logical CPUs" in card
    assert card_row(card, "things / student") == "| things / student | 0.8125 | 0.8125 | 0.9688 |"
    assert card_row(card, "things / teacher") == "| things / teacher | 0.9062 | 0.9062 | 1 |"
    assert ", ".join(tiny_export.domain.classnames) in card


def test_cli_export_torchscript_without_benchmark(tiny_export, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("red\ngreen\nblue\n")
    out = tmp_path / "export"
    main(
        ["export", "--student", str(tiny_export.student_dir), "--classes", str(classes)]
        + ["--out", str(out), "--format", "torchscript", "--no-bench"]
    )
    printed = capsys.readouterr().out
    assert "torchscript" in printed and "verified" in printed and "parameters" in printed
    assert sorted(p.name for p in out.iterdir()) == [CARD_NAME, LABELS_NAME, "model.torchscript.pt"]
    card = (out / CARD_NAME).read_text()
    assert "Not measured (export.bench is off)." in card
    assert "No evaluation results were given" in card
    assert json.loads((out / LABELS_NAME).read_text())["classnames"] == ["red", "green", "blue"]


def test_verification_failure_fails_loudly_and_leaves_no_file(tiny_export, tmp_path):
    out = tmp_path / "export"
    config = ExportConfig(formats=["onnx"], atol=0.0, bench=False)
    with pytest.raises(SynthdistillError, match="differs from PyTorch by .* it was not written"):
        export_student(tiny_export.student_dir, tiny_export.domain, out, config)
    assert list(out.iterdir()) == []


def test_open_clip_refuses_a_student_open_clip_builds_differently(tmp_path):
    """timm ViTs pooled with 'avg' normalise after pooling (fc_norm); open_clip's tower before it."""
    teacher = load_teacher("tiny")
    student = create_student(
        "test_vit", teacher.embed_dim, preprocessing=teacher.preprocessing, teacher="tiny"
    )
    student_dir = save_student(student, tmp_path / "vit")
    from synthdistill.registry import domain_from_classes

    out = tmp_path / "export"
    config = ExportConfig(formats=["open_clip"], bench=False)
    with pytest.raises(SynthdistillError, match="does not match the student's layers"):
        export_student(student_dir, domain_from_classes(["a", "b"]), out, config)
    assert list(out.iterdir()) == []


def test_a_student_folder_without_weights_is_refused(tiny_export, tmp_path):
    incomplete = tmp_path / "student"
    incomplete.mkdir()
    shutil.copy(tiny_export.student_dir / "config.json", incomplete)
    with pytest.raises(SynthdistillError, match="'model.safetensors' is missing"):
        export_student(incomplete, tiny_export.domain, tmp_path / "out", ExportConfig(bench=False))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "config, message",
    [
        (ExportConfig(opset=17), "opset 17 is too old"),
        (ExportConfig(formats=["tflite"]), r"formats \['tflite'\] are not known"),
    ],
)
def test_bad_export_settings_are_refused_before_any_work(tiny_export, tmp_path, config, message):
    with pytest.raises(SynthdistillError, match=message):
        export_student(tiny_export.student_dir, tiny_export.domain, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


def test_missing_evaluation_results_are_refused_before_any_work(tiny_export, tmp_path):
    with pytest.raises(SynthdistillError, match="results '.*missing.json' do not exist"):
        export_student(
            tiny_export.student_dir,
            tiny_export.domain,
            tmp_path / "out",
            ExportConfig(),
            eval_results=tmp_path / "missing.json",
        )
    assert not (tmp_path / "out").exists()
