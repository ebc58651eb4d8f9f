"""Export: every format reproduces PyTorch, open_clip loads the student as a CLIP, the model card adds up."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from synthdistill.cli import main
from synthdistill.config import ExportConfig
from synthdistill.deploy.export import (
    CARD_NAME,
    OPEN_CLIP_DIR,
    OPEN_CLIP_WEIGHTS,
    TEACHER_TOWER,
    TORCHSCRIPT_INFO,
    export_student,
)
from synthdistill.deploy.forms import read_sample_images
from synthdistill.deploy.latency import Timing, count_flops, time_calls
from synthdistill.deploy.predict import EXPORT_FORMAT_VERSION, LABELS_NAME, ModelInfo
from synthdistill.deploy.zero_shot import classifier_for_domain
from synthdistill.errors import SynthdistillError
from synthdistill.student import create_student, load_student, save_student
from synthdistill.teacher import load_teacher


@pytest.fixture(scope="module")
def classifier(tiny_export):
    """The PyTorch reference the exports must reproduce."""
    return classifier_for_domain(tiny_export.student_dir, tiny_export.domain, head_cache=None)[0]


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
    assert labels["templates"] == list(tiny_export.domain.templates) and labels["superclass"] == "thing"


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


def card_row(card: str, first_cell: str, containing: str = "") -> str:
    (row,) = [line for line in card.splitlines() if line.startswith(f"| {first_cell}") and containing in line]
    return row


def test_model_card_lists_parameters_flops_and_onnx_runtime_latency_of_every_form_and_the_teacher(
    tiny_export,
):
    summary = tiny_export.summary
    card = (tiny_export.out_dir / CARD_NAME).read_text()
    student = load_student(tiny_export.student_dir)
    assert summary.student_parameters == sum(p.numel() for p in student.parameters())
    assert summary.teacher_parameters == sum(
        p.numel() for p in load_teacher("tiny").model.visual.parameters()
    )
    assert summary.teacher_flops == tiny_teacher_image_flops()
    assert summary.student_flops == count_flops(student, torch.zeros(1, 3, 64, 64)) > 0
    student_row, teacher_row = card_row(card, "student `", " px |"), card_row(card, "teacher `", " px |")
    assert (
        f"{summary.student_parameters:,}" in student_row
        and f"{summary.student_flops / 1e9:.4g}" in student_row
    )
    assert (
        f"{summary.teacher_parameters:,}" in teacher_row
        and f"{summary.teacher_flops / 1e9:.4g}" in teacher_row
    )
    cpu = [row for row in summary.latency if row.provider == "CPUExecutionProvider"]
    assert sorted((row.model, row.precision, row.batch_size) for row in cpu) == [
        ("student", "fp32", 1),
        ("student", "fp32", 32),
        ("student", "int8", 1),
        ("student", "int8", 32),
        ("teacher", "fp32", 1),
        ("teacher", "fp32", 32),
    ]
    assert all(row.threads >= 1 and row.timing.runs >= 1 for row in summary.latency)
    by_key = {(r.model, r.precision, r.batch_size): r for r in cpu}
    for model, precision in [("student", "fp32"), ("student", "int8"), ("teacher", "fp32")]:
        row = card_row(card, f"{model} `", f"| {precision} |")
        for batch in (1, 32):
            timing = by_key[model, precision, batch].timing
            assert f"{timing.median_ms:.2f} [{timing.q1_ms:.2f}-{timing.q3_ms:.2f}, {timing.runs}]" in row
            speedup = (
                by_key["teacher", "fp32", batch].milliseconds / by_key[model, precision, batch].milliseconds
            )
            assert f"{speedup:.2f}x" in row
    (int8,) = summary.forms
    int8_row = card_row(card, "student `", "| int8 |")
    assert int8_row.endswith(f"| {int8.agreement:.1%} ({int8.held_out_images} images) |")
    assert f"{os.cpu_count()} logical CPUs" in card and "intra-op threads" in card
    assert (
        card_row(card, "things | student") == "| things | student | 64 | 81.2 | 96.9 | 80.0 | 81.2 | 87.5 |"
    )
    assert card_row(card, "things | teacher") == "| things | teacher | 64 | 90.6 | 100.0 | 90.0 | 90.6 |  |"
    assert ", ".join(tiny_export.domain.classnames) in card


def test_int8_form_is_written_and_its_agreement_is_fp32s_on_held_out_synthetic_images(tiny_export):
    """The agreement recomputed from the two files on the images calibration did not see."""
    out = tiny_export.out_dir
    assert (out / "model.int8.onnx").is_file()
    (form,) = tiny_export.summary.forms
    assert form.precision == "int8" and form.written and form.path == out / "model.int8.onnx"
    int8_model = onnx.load(str(out / "model.int8.onnx"))
    assert {node.op_type for node in int8_model.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    assert json.loads({p.key: p.value for p in int8_model.metadata_props}["precision"]) == "int8"

    info = ModelInfo.from_json(json.loads((out / LABELS_NAME).read_text()), "labels.json")
    config = tiny_export.config
    samples = read_sample_images(
        tiny_export.root / "shards", info, config.calibration_images, config.agreement_images
    )
    assert not set(samples.calibration_keys) & set(samples.held_out_keys)
    assert len(samples.calibration_keys) == 32 and len(samples.held_out_keys) == 64 == form.held_out_images
    top1 = [
        ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        .run(["logits"], {"images": samples.held_out})[0]
        .argmax(axis=1)
        for name in ("model.onnx", "model.int8.onnx")
    ]
    assert form.agreement == pytest.approx(float(np.mean(top1[0] == top1[1])))
    assert 0.5 <= form.agreement <= 1.0


def test_a_form_below_min_agreement_is_not_written_and_the_export_still_succeeds(
    tiny_export, tmp_path, caplog
):
    """A random tiny student's int8 form flips some of 64 held-out images: at threshold 1.0 it is refused."""
    out = tmp_path / "export"
    config = ExportConfig(
        formats=["onnx"],
        precision=["fp32", "int8"],
        min_agreement=1.0,
        calibration_images=4,
        agreement_images=64,
        sample_images=str(tiny_export.root / "shards"),
        bench=False,
    )
    with caplog.at_level("WARNING", logger="synthdistill.deploy.export"):
        summary = export_student(tiny_export.student_dir, tiny_export.domain, out, config)
    (form,) = summary.forms
    assert not form.written and form.agreement < 1.0
    assert sorted(p.name for p in out.iterdir()) == [CARD_NAME, LABELS_NAME, "model.onnx"]
    sentence = form.refusal()
    assert f"{form.agreement:.1%} on 64 held-out" in sentence and "\n" not in sentence
    assert sentence in caplog.text and sentence in (out / CARD_NAME).read_text()


def test_the_teacher_tower_onnx_is_exported_once_per_teacher_and_reused(tiny_export, tmp_path):
    cache = tiny_export.root / "eval" / "zero_shot_heads"
    (tower,) = cache.glob(f"{TEACHER_TOWER}-*.onnx")
    before = tower.stat().st_mtime_ns
    config = ExportConfig(formats=["onnx"], bench_repeats=1, bench_seconds=0.01, cache_dir=str(cache))
    from synthdistill.registry import domain_from_classes

    summary = export_student(
        tiny_export.student_dir, domain_from_classes(["a", "b"]), tmp_path / "export", config
    )
    assert list(cache.glob(f"{TEACHER_TOWER}-*.onnx")) == [tower] and tower.stat().st_mtime_ns == before
    assert {row.model for row in summary.latency} == {"student", "teacher"}


def test_every_exported_file_is_readable_by_group_and_others(tiny_export):
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in tiny_export.out_dir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"model.onnx", "model.int8.onnx", OPEN_CLIP_WEIGHTS, CARD_NAME}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o644 & ~umask)}


def test_latency_timing_takes_at_least_min_runs_after_warm_up_and_reports_quartiles():
    calls = []
    timing = time_calls(lambda: calls.append(1), budget_s=0.0, min_runs=7, warmup=2)
    assert timing.runs == 7 and len(calls) == 9
    stats = Timing.of([0.004, 0.001, 0.003, 0.002, 0.005])
    assert (stats.median_ms, stats.q1_ms, stats.q3_ms, stats.min_ms, stats.max_ms) == pytest.approx(
        (3.0, 2.0, 4.0, 1.0, 5.0)
    )


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
    assert "Not measured: latency is measured on the ONNX model" in card
    assert "No evaluation results were given" in card
    assert json.loads((out / LABELS_NAME).read_text())["classnames"] == ["red", "green", "blue"]


def test_verification_failure_fails_loudly_and_leaves_no_file(tiny_export, tmp_path):
    out = tmp_path / "export"
    config = ExportConfig(formats=["onnx"], atol=0.0, bench=False, cache_dir=str(tmp_path / "cache"))
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
        (ExportConfig(formats=["torchscript"], precision=["int8"]), "add onnx to export.formats"),
        (ExportConfig(precision=["fp32", "int8"]), "holds no shards; set export.sample_images"),
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


def test_results_that_are_not_evaluates_are_refused_in_one_sentence(tiny_export, tmp_path):
    foreign = tmp_path / "results.json"
    foreign.write_text(json.dumps({"things": {"student": {"top1": 0.5}}}))
    with pytest.raises(SynthdistillError, match="is not a results.json written by `synthdistill evaluate`"):
        export_student(
            tiny_export.student_dir,
            tiny_export.domain,
            tmp_path / "out",
            ExportConfig(),
            eval_results=foreign,
        )
    assert not (tmp_path / "out").exists()


def test_fp16_alone_is_written_from_an_fp32_reference_that_is_not_kept(tiny_export, classifier, tmp_path):
    out = tmp_path / "export"
    config = ExportConfig(
        formats=["onnx"],
        precision=["fp16"],
        calibration_images=8,
        agreement_images=64,
        sample_images=str(tiny_export.root / "shards"),
        bench=False,
    )
    summary = export_student(tiny_export.student_dir, tiny_export.domain, out, config)
    assert sorted(p.name for p in out.iterdir()) == [CARD_NAME, LABELS_NAME, "model.fp16.onnx"]
    (form,) = summary.forms
    assert form.written and form.agreement >= 0.99 and form.held_out_images == 64
    model = onnx.load(str(out / "model.fp16.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    info = ModelInfo.from_json(json.loads((out / LABELS_NAME).read_text()), "labels.json")
    samples = read_sample_images(tiny_export.root / "shards", info, 8, 64)
    session = ort.InferenceSession(str(out / "model.fp16.onnx"), providers=["CPUExecutionProvider"])
    fp16_top1 = session.run(["logits"], {"images": samples.held_out})[0].argmax(axis=1)
    with torch.inference_mode():
        torch_top1 = classifier(torch.from_numpy(samples.held_out))[0].argmax(dim=1).numpy()
    assert np.mean(fp16_top1 == torch_top1) >= 0.99


@pytest.fixture(scope="module")
def photo_test_set(tmp_path_factory, tiny_export, make_blob):
    """A real-test-set stand-in: an image folder of the export's classes (PNG files, 6 per class)."""
    from synthdistill.evaluate.test_sets import image_folder_test_set

    root = tmp_path_factory.mktemp("photos")
    for label, name in enumerate(tiny_export.domain.classnames):
        (root / name).mkdir()
        for i in range(6):
            make_blob(1000 + 10 * label + i).resize((80, 64)).save(root / name / f"{i}.png")
    return image_folder_test_set(root, tiny_export.domain)


def onnx_top1(path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"images": images})[0].argmax(axis=1)


def test_forms_are_also_checked_on_the_real_test_set_evaluate_ran_on(tiny_export, photo_test_set, tmp_path):
    """The int8 form's agreement with fp32 on the test set's images, prepared as the deployed model
    prepares a photo (predict's load_image), recomputed from the two written files."""
    from synthdistill.deploy.predict import load_image
    from synthdistill.evaluate.test_sets import spread_indices

    out = tmp_path / "export"
    config = ExportConfig(
        formats=["onnx"],
        precision=["fp32", "int8"],
        min_agreement=0.05,
        calibration_images=8,
        agreement_images=20,
        sample_images=str(tiny_export.root / "shards"),
        bench=False,
    )
    summary = export_student(
        tiny_export.student_dir, tiny_export.domain, out, config, test_sets=[photo_test_set]
    )
    (form,) = summary.forms
    (tested,) = form.test_agreements
    assert form.written and tested.test_set == photo_test_set.name and tested.images == 20

    info = ModelInfo.from_json(json.loads((out / LABELS_NAME).read_text()), "labels.json")
    files = [photo_test_set.images.samples[i][0] for i in spread_indices(30, 20)]
    photos = np.stack([load_image(path, info) for path in files])
    top1 = [onnx_top1(out / name, photos) for name in ("model.onnx", "model.int8.onnx")]
    assert tested.agreement == pytest.approx(float(np.mean(top1[0] == top1[1])))
    card = (out / CARD_NAME).read_text()
    assert f"{tested.agreement:.1%} on 20 images of the {photo_test_set.name} test set" in card
    assert summary.to_dict()["forms"]["int8"]["test_sets"] == {
        photo_test_set.name: {"agreement": round(tested.agreement, 4), "images": 20}
    }


def test_a_form_that_agrees_on_synthetic_images_but_not_on_the_test_set_is_not_written(tiny_export, tmp_path):
    """Held-out synthetic images on which int8 and fp32 agree, test images on which they do not: refused,
    and the sentence names the test set."""
    from synthdistill.deploy.forms import SampleImages, export_form, quantize_int8

    out = tiny_export.out_dir
    info = ModelInfo.from_json(json.loads((out / LABELS_NAME).read_text()), "labels.json")
    samples = read_sample_images(tiny_export.root / "shards", info, 4, 64)
    int8 = tmp_path / "probe.int8.onnx"
    quantize_int8(out / "model.onnx", int8, samples.calibration)
    same = onnx_top1(out / "model.onnx", samples.held_out) == onnx_top1(int8, samples.held_out)
    assert same.any() and not same.all()  # the random tiny student's int8 form flips some images
    agreeing = SampleImages(samples.source, samples.calibration, samples.held_out[same], [], [])
    form = export_form(
        "int8",
        out / "model.onnx",
        tmp_path / "model.int8.onnx",
        info,
        agreeing,
        min_agreement=1.0,
        test_images={"things test": samples.held_out},
    )
    assert form.agreement == 1.0 and form.test_agreements[0].agreement == pytest.approx(same.mean())
    assert not form.written and not (tmp_path / "model.int8.onnx").exists()
    assert "images of things test, below export.min_agreement=1" in form.refusal()


def test_run_and_export_check_the_forms_on_the_test_sets_the_evaluation_read(tmp_path, make_blob):
    """The real test sets evaluate reads go to export when evaluate ran and a fp16/int8 form is asked
    for; a run of a user's own classes (evaluated on its synthetic images) and an fp32-only export
    get none."""
    from synthdistill.config import load_recipe
    from synthdistill.pipeline import export_test_sets
    from synthdistill.registry import get_dataset, resolve_domain

    pets = tmp_path / "data" / "oxford-iiit-pet"
    (pets / "images").mkdir(parents=True)
    (pets / "annotations").mkdir()
    names = get_dataset("pets").classnames
    for i in range(3):
        make_blob(i, 32).save(pets / "images" / f"{names[i].replace(' ', '_')}_{i}.jpg", format="JPEG")
    lines = [f"{names[i].replace(' ', '_')}_{i} {i + 1} 1 1" for i in range(3)]
    (pets / "annotations" / "test.txt").write_text("\n".join(lines) + "\n")
    results = tmp_path / "results.json"
    results.write_text("{}")

    def test_sets(*overrides: str, results=results) -> list[str]:
        recipe = load_recipe(overrides=[f"evaluate.data_root={tmp_path / 'data'}", *overrides])
        domain = resolve_domain(recipe.dataset, recipe.classes_file, recipe.superclass)
        return [t.name for t in export_test_sets(recipe, domain, results)]

    assert test_sets("dataset=pets", "export.precision=[fp32,int8]") == ["pets"]
    assert test_sets("dataset=pets", "export.precision=[fp32,int8]", results=None) == []
    assert test_sets("dataset=pets", "export.precision=[fp32]") == []
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    assert test_sets(f"classes_file={classes}", "export.precision=[int8]") == []
    empty = tmp_path / "nothing"
    assert test_sets("dataset=pets", "export.precision=[int8]", f"evaluate.data_root={empty}") == []
