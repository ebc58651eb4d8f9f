"""Predict: real photographs and generated PNG/JPEG/WebP files, bad files skipped, bad input refused."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from synthdistill.cli import main
from synthdistill.deploy.predict import ModelInfo, collect_images, load_image, predict
from synthdistill.deploy.zero_shot import predict_student
from synthdistill.errors import SynthdistillError
from synthdistill.registry import domain_from_classes

CLASSES = ("cat", "dog", "bird", "fish", "car")


def real_photographs() -> list[str]:
    """Photographs shipped by installed libraries: matplotlib's (a dependency), scikit-learn's if present."""
    import matplotlib.cbook

    photos = [str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))]
    try:
        import sklearn.datasets

        folder = Path(sklearn.datasets.__file__).parent / "images"
        photos += [str(folder / name) for name in ("china.jpg", "flower.jpg") if (folder / name).is_file()]
    except ImportError:
        pass
    return photos


def assert_valid_top_k(prediction, k: int) -> None:
    assert len(prediction.classes) == len(prediction.probabilities) == len(prediction.indices) == k
    assert all(CLASSES[i] == name for i, name in zip(prediction.indices, prediction.classes, strict=True))
    assert len(set(prediction.indices)) == k
    assert all(0.0 <= p <= 1.0 for p in prediction.probabilities)
    assert prediction.probabilities == sorted(prediction.probabilities, reverse=True)
    assert sum(prediction.probabilities) <= 1.0 + 1e-9


@pytest.fixture(scope="module")
def onnx_model(tiny_export) -> Path:
    return tiny_export.out_dir / "model.onnx"


@pytest.fixture
def image_folder(tmp_path, make_image) -> Path:
    """PNG (RGBA, wide), JPEG (tall), WebP and a grayscale PNG in a nested folder."""
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    make_image(1, 96).resize((96, 60)).convert("RGBA").save(folder / "wide.png")
    make_image(2, 80).resize((50, 90)).save(folder / "tall.jpg", quality=90)
    make_image(3, 64).save(folder / "nested" / "square.webp")
    make_image(4, 70).convert("L").save(folder / "nested" / "gray.png")
    (folder / "notes.txt").write_text("not an image, and not picked from a folder")
    return folder


def test_preprocessing_equals_open_clips_eval_transform(tmp_path, make_image):
    """Same pixels as the student saw in evaluation: resize shortest side (bicubic), centre crop."""
    from open_clip.transform import image_transform

    transform = image_transform(64, is_train=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    info = ModelInfo(classnames=CLASSES, image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    make_image(9, 120).resize((121, 77)).save(tmp_path / "wide.png")
    make_image(9, 120).resize((77, 121)).save(tmp_path / "tall.png")
    for path in [real_photographs()[0], tmp_path / "wide.png", tmp_path / "tall.png"]:
        with Image.open(path) as image:
            expected = transform(image.convert("RGB")).numpy()
        got = load_image(path, info)
        assert got.shape == (3, 64, 64) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """scikit-learn's two sample photographs, each also mirrored and cropped to its four quarters."""
    from sklearn.datasets import load_sample_images

    folder = tmp_path_factory.mktemp("photos")
    for number, array in enumerate(load_sample_images().images):
        photo = Image.fromarray(array)
        width, height = photo.size
        variants = {"photo": photo, "mirrored": photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)}
        for i, (left, top) in enumerate(
            [(0, 0), (width // 2, 0), (0, height // 2), (width // 2, height // 2)]
        ):
            variants[f"quarter{i}"] = photo.crop((left, top, left + width // 2, top + height // 2))
        for name, image in variants.items():
            image.save(folder / f"{number}-{name}.jpg", quality=95)
    return folder


def test_the_student_folder_classifies_real_photos_exactly_as_its_onnx_export_without_class_options(
    tiny_export, onnx_model, photo_folder
):
    """predict --student takes classes, templates and superclass from the run's export/labels.json."""
    from_onnx = predict(onnx_model, [str(photo_folder)], top_k=3)
    from_student = predict_student(tiny_export.student_dir, [str(photo_folder)], top_k=3)
    assert len(from_onnx) == 12 and [p.path for p in from_student] == [p.path for p in from_onnx]
    for a, b in zip(from_onnx, from_student, strict=True):
        assert_valid_top_k(a, 3)
        assert a.indices[0] == b.indices[0]
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-4)
    labels = tiny_export.out_dir / "labels.json"
    explicit = predict_student(tiny_export.student_dir, [str(photo_folder)], labels=labels, top_k=3)
    assert [p.indices for p in explicit] == [p.indices for p in from_student]


def test_the_int8_model_predicts_like_the_fp32_one(tiny_export, photo_folder, capsys):
    int8 = tiny_export.out_dir / "model.int8.onnx"
    main(["predict", "--model", str(int8), str(photo_folder), "--top-k", "5", "--json"])
    from_int8 = json.loads(capsys.readouterr().out)
    from_fp32 = predict(tiny_export.out_dir / "model.onnx", [str(photo_folder)], top_k=5)
    assert [r["path"] for r in from_int8] == [p.path for p in from_fp32]
    for result in from_int8:
        assert sorted(c["class"] for c in result["top_k"]) == sorted(CLASSES)
        assert sum(c["probability"] for c in result["top_k"]) == pytest.approx(1.0, abs=1e-6)
    agreement = np.mean(
        [r["top_k"][0]["index"] == p.indices[0] for r, p in zip(from_int8, from_fp32, strict=True)]
    )
    assert agreement >= tiny_export.config.min_agreement


def test_png_jpeg_webp_and_gray_files_each_get_a_valid_top_k_in_any_batching(onnx_model, image_folder):
    in_batches = predict(onnx_model, [str(image_folder)], top_k=5, batch_size=3)
    assert sorted(Path(p.path).name for p in in_batches) == [
        "gray.png",
        "square.webp",
        "tall.jpg",
        "wide.png",
    ]
    for prediction in in_batches:
        assert_valid_top_k(prediction, 5)
        assert sum(prediction.probabilities) == pytest.approx(1.0, abs=1e-6)  # k = all classes
    one_by_one = predict(onnx_model, [str(image_folder)], top_k=5, batch_size=1)
    for a, b in zip(in_batches, one_by_one, strict=True):
        assert a.path == b.path and a.indices == b.indices
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-6)


def test_a_corrupt_file_is_reported_and_the_others_classified(onnx_model, image_folder, caplog):
    (image_folder / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    whole = (image_folder / "tall.jpg").read_bytes()
    (image_folder / "nested" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    with caplog.at_level(logging.WARNING, logger="synthdistill.predict"):
        predictions = predict(onnx_model, [str(image_folder)], top_k=2, batch_size=2)
    assert sorted(Path(p.path).name for p in predictions) == [
        "gray.png",
        "square.webp",
        "tall.jpg",
        "wide.png",
    ]
    reported = [r.getMessage() for r in caplog.records]
    assert len(reported) == 2
    assert any("corrupt.jpg" in m and "not an image" in m for m in reported)
    assert any("truncated.jpg" in m and "could not be decoded" in m for m in reported)


def test_files_folders_and_globs_are_collected_once_each(image_folder):
    collected = collect_images(
        [str(image_folder / "wide.png"), str(image_folder / "nested"), str(image_folder / "**" / "*.png")]
    )
    names = [p.relative_to(image_folder).as_posix() for p in collected]
    assert names == ["wide.png", "nested/gray.png", "nested/square.webp"]


def test_a_class_list_renames_the_onnx_classes(onnx_model, make_image, tmp_path):
    make_image(5).save(tmp_path / "a.png")
    renamed = domain_from_classes(["Katze", "Hund", "Vogel", "Fisch", "Auto"])
    (original,) = predict(onnx_model, [str(tmp_path / "a.png")], top_k=5)
    (german,) = predict(onnx_model, [str(tmp_path / "a.png")], domain=renamed, top_k=5)
    assert german.indices == original.indices
    assert german.classes == [renamed.classnames[i] for i in original.indices]


def rewrite_metadata(source: Path, target: Path, change) -> Path:
    model = onnx.load(str(source))
    props = {p.key: p.value for p in model.metadata_props}
    del model.metadata_props[:]
    for key, value in change(props).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(target))
    return target


def lone_copy(student_dir: Path, folder: Path) -> Path:
    """The student folder outside its run directory: no export/labels.json beside it."""
    return Path(shutil.copytree(student_dir, folder / "lone" / "student"))


def test_bad_input_is_refused_with_one_clear_line(tiny_export, onnx_model, tmp_path, make_image):
    lone_student = lone_copy(tiny_export.student_dir, tmp_path)
    make_image(6).save(tmp_path / "ok.png")
    image = [str(tmp_path / "ok.png")]
    (tmp_path / "text.jpg").write_text("hello")
    cases = {
        "is not an image Pillow can read": lambda: predict(onnx_model, [str(tmp_path / "text.jpg")]),
        "has 2 classes but .* was exported with 5": lambda: predict(
            onnx_model, image, domain=domain_from_classes(["a", "b"])
        ),
        "needs the classes: pass --labels": lambda: predict_student(lone_student, image),
        "is a student folder, which runs on PyTorch": lambda: predict(tiny_export.student_dir, image),
        "either --labels or --dataset / --classes": lambda: predict_student(
            tiny_export.student_dir,
            image,
            labels=tiny_export.out_dir / "labels.json",
            domain=tiny_export.domain,
        ),
        "is not a file, a folder or a glob": lambda: predict(onnx_model, [str(tmp_path / "missing.png")]),
        "matches no file": lambda: predict(onnx_model, [str(tmp_path / "*.gif")]),
        "neither an exported .onnx file nor an export folder": lambda: predict(tmp_path / "ok.png", image),
    }
    for message, call in cases.items():
        with pytest.raises(SynthdistillError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


def test_a_student_folder_without_weights_is_refused(tiny_export, tmp_path, make_image):
    incomplete = tmp_path / "student"
    incomplete.mkdir()
    shutil.copy(tiny_export.student_dir / "config.json", incomplete)
    make_image(7).save(tmp_path / "a.png")
    with pytest.raises(SynthdistillError, match="'model.safetensors' is missing"):
        predict_student(incomplete, [str(tmp_path / "a.png")], domain=tiny_export.domain)


def test_an_onnx_file_of_another_export_format_version_is_refused(onnx_model, tmp_path, make_image):
    make_image(8).save(tmp_path / "a.png")
    image = [str(tmp_path / "a.png")]
    newer = rewrite_metadata(
        onnx_model, tmp_path / "newer.onnx", lambda p: {**p, "synthdistill_format_version": "99"}
    )
    with pytest.raises(SynthdistillError, match="export format version 99 .* re-export it"):
        predict(newer, image)
    foreign = rewrite_metadata(onnx_model, tmp_path / "foreign.onnx", lambda p: {})
    with pytest.raises(SynthdistillError, match="carries no synthdistill metadata"):
        predict(foreign, image)
    (tmp_path / "broken.onnx").write_bytes(b"not protobuf")
    with pytest.raises(SynthdistillError, match="not an ONNX model onnxruntime can load"):
        predict(tmp_path / "broken.onnx", image)


def test_cli_predict_prints_json_and_text_and_skips_unreadable_files(
    onnx_model, tmp_path, make_image, capsys
):
    make_image(10).save(tmp_path / "a.png")
    make_image(11).save(tmp_path / "b.jpg")
    (tmp_path / "bad.png").write_bytes(b"nope")
    files = [str(tmp_path / name) for name in ("a.png", "bad.png", "b.jpg")]
    main(["predict", "--model", str(onnx_model), *files, "--top-k", "2", "--json"])
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    classified = [r for r in results if "skipped" not in r]
    assert [r["path"] for r in classified] == [files[0], files[2]]
    assert all(len(r["top_k"]) == 2 and r["top_k"][0]["class"] in CLASSES for r in classified)
    assert [(r["path"], bool(r["skipped"])) for r in results if "skipped" in r] == [(files[1], True)]
    assert "skipped" in captured.err and "bad.png" in captured.err

    main(["predict", "--model", str(onnx_model), files[0], "--top-k", "3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == files[0] and len(lines) == 4
    percents = [float(line.split()[0].rstrip("%")) for line in lines[1:]]
    assert percents == sorted(percents, reverse=True) and all(0 <= p <= 100 for p in percents)
    assert {line.split()[1] for line in lines[1:]} <= set(CLASSES)


def test_cli_predict_with_a_student_folder_and_an_error_exit(tiny_export, tmp_path, make_image, capsys):
    make_image(12).save(tmp_path / "a.png")
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    main(["predict", "--student", str(tiny_export.student_dir), "--classes", str(classes), str(tmp_path)])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == str(tmp_path / "a.png") and len(out.splitlines()) == 6
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "predict",
                "--student",
                str(lone_copy(tiny_export.student_dir, tmp_path)),
                str(tmp_path / "a.png"),
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--classes" in err[0]


def test_onnx_prediction_runs_on_onnxruntime_without_importing_torch_or_timm(
    tiny_export, tmp_path, make_image
):
    """What a deployment needs: onnxruntime, Pillow, numpy; the export folder may stand for its model."""
    make_image(13).save(tmp_path / "a.png")
    code = (
        "import sys\n"
        "from synthdistill.deploy.predict import predict\n"
        f"image = [{str(tmp_path / 'a.png')!r}]\n"
        f"(p,) = predict({str(tiny_export.out_dir)!r}, image, top_k=2)\n"
        f"(q,) = predict({str(tiny_export.out_dir / 'model.int8.onnx')!r}, image, top_k=2)\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'open_clip') if m in sys.modules)\n"
        "print(len(p.classes), len(q.classes), heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["2", "2", "[]"]
