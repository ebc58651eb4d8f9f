"""Stage 4: metrics, the template-ensemble head, the agreement bound, whole evaluations with tiny models."""

import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from synthdistill.cli import main
from synthdistill.config import EvaluateConfig
from synthdistill.errors import SynthdistillError
from synthdistill.evaluate import evaluate
from synthdistill.evaluate.agreement import AgreementBound
from synthdistill.evaluate.protocols import classification_scores
from synthdistill.registry import domain_from_classes, get_dataset
from synthdistill.student import create_student, load_student, save_student
from synthdistill.teacher import cached_zero_shot_head
from test_eval_data import write_aircraft, write_folder, write_mirror, write_pets


def config(data_root, **overrides) -> EvaluateConfig:
    return EvaluateConfig(data_root=str(data_root), batch_size=4, workers=0, **overrides)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """An untrained tiny student that names the tiny teacher, as distillation would save it."""
    from synthdistill.teacher import load_teacher

    teacher = load_teacher("tiny")
    student = create_student("tiny", teacher.embed_dim, preprocessing=teacher.preprocessing, teacher="tiny")
    return save_student(student, tmp_path_factory.mktemp("run") / "student")


def test_metrics_on_hand_made_logits():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5],  # class 0: right
            [5.0, 9, 1, 2, 3, 4],  # class 0: wrong, second -> in the top 5
            [9.0, 5, 4, 3, 2, 1],  # class 0: right
            [1.0, 9, 2, 3, 4, 5],  # class 1: right
            [5.0, 0, 6, 7, 8, 9],  # class 1: wrong, last -> not in the top 5
            [1.0, 2, 9, 3, 4, 5],  # class 2: right
        ]
    )
    scores = classification_scores(logits, labels)
    assert scores.top1 == pytest.approx(4 / 6)
    assert scores.top5 == pytest.approx(5 / 6)
    assert scores.mean_per_class_recall == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)  # classes 3-5 absent
    assert classification_scores(logits[:, :4], labels).top5 is None


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_mean_per_class_recall_is_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 7, generator=generator)
    labels = torch.randint(0, 6, (200,), generator=generator)  # class 6 never occurs but is predicted
    expected = balanced_accuracy_score(labels.numpy(), logits.argmax(1).numpy())
    assert classification_scores(logits, labels).mean_per_class_recall == pytest.approx(expected, abs=1e-12)


def test_agreement_bound_on_constructed_embeddings():
    head = torch.eye(3)  # w_c = e_c, so ||w_a - w_b|| = sqrt(2)
    t = F.normalize(torch.tensor([1.0, 0.2, 0.0]), dim=0)
    threshold = (t[0] - t[1]) / math.sqrt(2)  # the closest rival is class 1
    near = F.normalize(t + torch.tensor([0.0, 0.0, 0.3]), dim=0)  # eps below threshold
    far = F.normalize(t + torch.tensor([0.0, 0.0, 0.8]), dim=0)  # still class 0, eps above threshold
    flipped = F.normalize(torch.tensor([0.2, 1.0, 0.0]), dim=0)  # predicts class 1
    students = torch.stack([near, far, flipped])
    teachers = t.expand(3, 3)
    eps = (students - teachers).norm(dim=1)
    assert eps[0] < threshold < eps[1]
    assert (students @ head).argmax(1).tolist() == [0, 0, 1]
    assert AgreementBound(head).guaranteed(students, teachers).tolist() == [True, False, False]


def test_the_bound_never_claims_more_than_the_measured_agreement():
    generator = torch.Generator().manual_seed(0)
    head = F.normalize(torch.randn(16, 10, generator=generator), dim=0)
    teachers = F.normalize(torch.randn(500, 16, generator=generator), dim=1)
    students = F.normalize(teachers + 0.1 * torch.randn(500, 16, generator=generator), dim=1)
    bound = AgreementBound(head)
    guaranteed = bound.guaranteed(students, teachers)
    agree = (students @ head).argmax(1) == (teachers @ head).argmax(1)
    assert not (guaranteed & ~agree).any()
    assert 0 < guaranteed.sum() < agree.sum() < 500
    assert torch.allclose(bound.class_distances, (head[:, :, None] - head[:, None, :]).norm(dim=0), atol=1e-6)
    by_batch = torch.cat(
        [bound.guaranteed(s, t) for s, t in zip(students.split(64), teachers.split(64), strict=True)]
    )
    assert torch.equal(by_batch, guaranteed)  # the distances computed once serve every batch


def test_zero_shot_head_is_the_template_ensemble_and_is_cached(tmp_path, tiny_teacher):
    classes, templates = (
        ("red fox", "grey wolf"),
        ("a photo of a {c}.", "a {c} in the snow.", "art of a {c}."),
    )
    head = cached_zero_shot_head(tiny_teacher, classes, templates, tmp_path, "animals")
    for c, name in enumerate(classes):
        per_template = F.normalize(tiny_teacher.encode_texts([t.format(c=name) for t in templates]), dim=1)
        assert torch.allclose(head[:, c], F.normalize(per_template.mean(0), dim=0), atol=1e-6)
    (cached,) = tmp_path.glob("animals-*.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert cached.stat().st_mode & 0o777 == 0o644 & ~umask  # a cache another user of the run can read
    from safetensors.torch import save_file

    save_file({"head": torch.zeros_like(head)}, str(cached))
    assert torch.equal(
        cached_zero_shot_head(tiny_teacher, classes, templates, tmp_path, "animals"), torch.zeros_like(head)
    )
    other = cached_zero_shot_head(tiny_teacher, classes, templates[:1], tmp_path, "animals")
    assert not torch.equal(other, torch.zeros_like(head))
    assert len(list(tmp_path.glob("animals-*.safetensors"))) == 2


def test_teacher_top1_equals_clip_benchmark(tmp_path, tiny_teacher):
    """Faithfulness: CLIP_benchmark's own dataset builder, head and classification pass on the same model.

    Its ``evaluate()`` cannot run under NumPy >= 2.4 (``float()`` of a 1-element array in its
    ``accuracy()``), so its metrics are computed from its logits as ``evaluate()`` does: top-1 of the
    logits and scikit-learn's balanced accuracy of their argmax.
    """
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as cb
    from safetensors.torch import load_file
    from sklearn.metrics import balanced_accuracy_score

    def clip_benchmark_logits():
        dataset = build_dataset("fgvc_aircraft", str(tmp_path), tiny_teacher.preprocess_val, download=False)
        loader = torch.utils.data.DataLoader(dataset, batch_size=4)
        return cb.run_classification(tiny_teacher.model, classifier, loader, "cpu", amp=False)

    write_aircraft(tmp_path, [0] * 10)
    dataset = build_dataset("fgvc_aircraft", root=str(tmp_path), download=False)
    assert dataset.classes == list(get_dataset("aircraft").classnames)
    assert dataset.templates == list(get_dataset("aircraft").templates)
    classifier = cb.zero_shot_classifier(
        tiny_teacher.model, tiny_teacher.tokenizer, dataset.classes, dataset.templates, "cpu", amp=False
    )
    # label even images with CLIP_benchmark's prediction and odd ones with another class: top-1 is 1/2
    predicted = clip_benchmark_logits()[0].argmax(1).tolist()
    write_aircraft(tmp_path, [p if i % 2 == 0 else (p + 1 + i) % 100 for i, p in enumerate(predicted)])
    logits, target = clip_benchmark_logits()
    their_top1 = (logits.argmax(1) == target).float().mean().item()
    their_recall = balanced_accuracy_score(target.numpy(), logits.argmax(1).numpy())

    results = evaluate(config(tmp_path, datasets=["aircraft"]), tmp_path / "eval", teacher="tiny")
    ours = results.entry("aircraft", "teacher")
    assert their_top1 == 0.5
    assert ours.top1 == their_top1
    assert ours.mean_per_class_recall == pytest.approx(their_recall, abs=1e-12)
    (head,) = (tmp_path / "eval" / "zero_shot_heads").glob("aircraft-*.safetensors")
    assert torch.allclose(load_file(str(head))["head"], classifier, atol=1e-5)


def test_cli_evaluates_a_student_on_fake_pets_and_prints_the_table(tmp_path, student_dir, capsys):
    write_pets(tmp_path / "data", [0, 1, 2, 3, 4, 5, 6])
    (tmp_path / "data" / "oxford-iiit-pet" / "images" / "Beagle_104.jpg").write_bytes(b"\xff\xd8 broken")
    main(
        [
            "evaluate",
            "--student",
            str(student_dir),
            "--datasets",
            "pets",
            "--data-root",
            str(tmp_path / "data"),
        ]
        + ["--batch-size", "4", "--workers", "0", "--device", "cpu"]
    )
    printed = capsys.readouterr().out
    assert "| dataset | protocol | model | images |" in printed
    assert "| pets | clip_benchmark | teacher | 6 |" in printed
    assert "| pets | clip_benchmark | student | 6 |" in printed
    assert "Unreadable images skipped: pets 1." in printed

    out = student_dir.parent / "eval"
    assert (out / "results.md").read_text() in printed
    results = json.loads((out / "results.json").read_text())
    assert results["precision"] == "fp32" and results["teacher"] == "tiny"
    student = next(e for e in results["entries"] if e["model"] == "student")
    assert student["n_images"] == 6 and student["skipped_images"] == 1
    assert student["headline_metric"] == "mean_per_class_recall"
    assert student["headline"] == student["mean_per_class_recall"]
    assert student["templates"] == list(get_dataset("pets").templates)
    assert student["protocol"] == "clip_benchmark" and student["precision"] == "fp32"
    assert student["preprocessing"] == json.loads(
        json.dumps(dataclasses.asdict(load_student(student_dir).config.preprocessing))
    )
    assert 0 <= student["agreement_guaranteed_by_bound"] <= student["agreement_with_teacher"] <= 1
    assert student["mean_student_teacher_distance"] > 0

    teacher_alone = evaluate(config(tmp_path / "data", datasets=["pets"]), tmp_path / "alone", teacher="tiny")
    teacher_beside = next(e for e in results["entries"] if e["model"] == "teacher")
    assert teacher_alone.entry("pets", "teacher").top5 == teacher_beside["top5"]
    assert (
        teacher_alone.entry("pets", "teacher").mean_per_class_recall
        == teacher_beside["mean_per_class_recall"]
    )


def test_student_on_an_image_folder_with_a_class_file(tmp_path, student_dir):
    write_folder(tmp_path / "test", {"red_fox": 2, "grey_wolf": 3})
    domain = domain_from_classes(["grey wolf", "red fox"], superclass="animal")
    settings = config(tmp_path, image_folder=str(tmp_path / "test"), precision="bf16")
    results = evaluate(settings, tmp_path / "eval", student_dir=student_dir, domain=domain)
    entry = results.entry("test", "student")
    assert entry.precision == results.precision == "bf16"  # CPU autocast runs the GPU path's code
    assert entry.n_images == 5 and entry.num_classes == 2 and entry.top5 is None
    assert entry.templates == ["a photo of a {c}, a type of animal."]


def test_mirror_with_max_images_and_labels_beyond_the_classes(tmp_path):
    write_mirror(tmp_path / "mirror", [0, 1, 0, 1, 0], ["cat", "dog"], ["a photo of a {c}."])
    results = evaluate(
        config(tmp_path, image_folder=str(tmp_path / "mirror"), max_images=3), tmp_path / "e", teacher="tiny"
    )
    assert results.entry("mirror", "teacher").n_images == 3
    write_mirror(tmp_path / "bad", [0, 2], ["cat", "dog"], ["a photo of a {c}."])
    with pytest.raises(SynthdistillError, match="has label 2 but only 2 class names"):
        evaluate(config(tmp_path, image_folder=str(tmp_path / "bad")), tmp_path / "e2", teacher="tiny")


def test_student_of_another_embedding_size_is_named(tmp_path):
    write_pets(tmp_path, [0])
    save_student(create_student("tiny", 16, teacher="tiny"), tmp_path / "student")
    with pytest.raises(SynthdistillError, match="outputs 16-d embeddings but teacher 'tiny' has 32-d ones"):
        evaluate(config(tmp_path, datasets=["pets"]), tmp_path / "eval", student_dir=tmp_path / "student")


def test_missing_data_fails_before_any_model_or_file(tmp_path, student_dir):
    with pytest.raises(SynthdistillError, match="Dataset 'flowers102' not found"):
        evaluate(
            config(tmp_path / "nothing", datasets=["flowers102"]), tmp_path / "eval", student_dir=student_dir
        )
    assert not (tmp_path / "eval").exists()


def test_custom_classes_without_a_test_set_leave_a_note(tmp_path):
    domain = domain_from_classes(["cat", "dog"])
    results = evaluate(config(tmp_path), tmp_path / "eval", teacher="tiny", domain=domain)
    assert results.entries == []
    assert "No real test set" in (tmp_path / "eval" / "results.md").read_text()
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["entries"] == []


def test_naming_the_students_teacher_keeps_its_pretrained_weights():
    from synthdistill.evaluate.stage import _teacher_name
    from synthdistill.student import create_student

    student = create_student("tiny", 32, teacher="ViT-B-32", teacher_pretrained="datacomp_xl_s13b_b90k")
    assert _teacher_name(student, None, "ViT-B-32", None) == ("ViT-B-32", "datacomp_xl_s13b_b90k")
    assert _teacher_name(student, None, "ViT-B-32", "laion2b_s34b_b79k") == ("ViT-B-32", "laion2b_s34b_b79k")
    assert _teacher_name(student, None, "ViT-B-16", None) == ("ViT-B-16", None)


def test_cli_image_folder_takes_the_named_classes_or_its_own_folders(tmp_path, write_shards):
    write_shards(tmp_path / "shards", 6)  # class indices 0-2, labels within Pets' 37 classes
    common = ["--teacher-only", "--teacher", "tiny", "--batch-size", "4", "--workers", "0", "--device", "cpu"]
    shards = ["--image-folder", str(tmp_path / "shards"), "--out", str(tmp_path / "shards-eval")]
    main(["evaluate", *common, *shards, "--dataset", "pets"])
    (entry,) = json.loads((tmp_path / "shards-eval" / "results.json").read_text())["entries"]
    assert (entry["dataset"], entry["num_classes"], entry["n_images"]) == ("pets (synthetic)", 37, 6)

    write_folder(tmp_path / "animals", {"red_fox": 1, "grey_wolf": 2})
    folder = ["--set", f"evaluate.image_folder={tmp_path / 'animals'}", "--out", str(tmp_path / "folder")]
    main(["evaluate", *common, *folder])  # the recipe's image folder, no classes named: its folders'
    (entry,) = json.loads((tmp_path / "folder" / "results.json").read_text())["entries"]
    assert (entry["dataset"], entry["num_classes"], entry["n_images"]) == ("animals", 2, 3)
