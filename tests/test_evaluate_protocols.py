"""The two zero-shot protocols: the paper's (one template, one shared bilinear crop, fp32, top-1) and
CLIP_benchmark's (its mixed-precision scope and its tie rule), and validation during training."""

import json
import logging
from pathlib import Path

import pytest
import sklearn.datasets
import torch
import torchvision.transforms as T
from PIL import Image

from synthdistill.config import EvaluateConfig
from synthdistill.evaluate import evaluate, stage, zero_shot_top1
from synthdistill.evaluate.protocols import (
    CLIP_MEAN,
    CLIP_STD,
    PAPER_TEMPLATES,
    paper_preprocessing,
    paper_template,
)
from synthdistill.evaluate.stage import Encoder, zero_shot_pass
from synthdistill.evaluate.test_sets import image_folder_test_set
from synthdistill.registry import get_dataset
from synthdistill.student import create_student, load_student, save_student
from synthdistill.teacher import Preprocessing, cached_zero_shot_head, load_teacher
from test_eval_data import write_mirror, write_pets

REAL_IMAGE = Path(sklearn.datasets.__file__).parent / "images" / "china.jpg"  # a 640 x 427 photograph


def config(data_root, **overrides) -> EvaluateConfig:
    return EvaluateConfig(data_root=str(data_root), batch_size=4, workers=0, **overrides)


def reference_paper_transform(size: int) -> T.Compose:
    """The authors' test transform written out in torchvision."""
    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def test_paper_transform_is_bilinear_short_side_224_and_centre_crop_on_a_real_image():
    image = Image.open(REAL_IMAGE).convert("RGB")
    assert image.size[0] != image.size[1]  # the crop matters
    ours = paper_preprocessing(224).eval_transform()(image)
    assert ours.shape == (3, 224, 224)
    assert torch.equal(ours, reference_paper_transform(224)(image))
    bicubic = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
    assert not torch.equal(ours, reference_paper_transform(224).transforms[-1](T.ToTensor()(bicubic(image))))


def test_paper_templates_are_the_authors():
    assert set(PAPER_TEMPLATES) == {"pets", "food101", "flowers102", "cars", "aircraft", "dtd", "imagenet100"}
    assert paper_template("food101") == "a photo of a {c}, a type of food."
    assert paper_template("dtd") == "a photo of a {c} texture."
    assert paper_template("imagenet100") == "a photo of a {c}"
    assert paper_template(None) == "a photo of a {c}."


def test_paper_protocol_on_fake_pets(tmp_path, monkeypatch):
    """One template per class (recorded), top-1 headline, fp32 even when bf16 is asked, and one tensor,
    the reference transform's, for student and teacher, though the student's own preprocessing differs."""
    labels = [0, 5, 36, 5, 9, 2, 7]
    write_pets(tmp_path / "data", labels)
    teacher = load_teacher("tiny")
    own = Preprocessing(48, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), interpolation="bicubic")
    student = create_student("tiny", 32, preprocessing=own, image_size=48, teacher="tiny")
    student_dir = save_student(student, tmp_path / "s")
    student = load_student(student_dir)
    seen = {"teacher": [], "student": []}
    teacher.model.visual.register_forward_pre_hook(lambda m, args: seen["teacher"].append(args[0]))
    student.trunk.register_forward_pre_hook(lambda m, args: seen["student"].append(args[0]))
    monkeypatch.setattr(stage, "load_teacher", lambda *args: teacher)
    monkeypatch.setattr(stage, "load_student", lambda *args: student)

    settings = config(tmp_path / "data", datasets=["pets"], protocols=["clip_benchmark", "paper"])
    settings.precision = "bf16"
    results = evaluate(settings, tmp_path / "eval", student_dir=student_dir)

    # two batches per pass: clip_benchmark's first (each model its own tensor), then the paper's
    assert [x.shape[-1] for x in seen["teacher"]] == [64, 64, 64, 64]
    assert [x.shape[-1] for x in seen["student"]] == [48, 48, 64, 64]
    paper_teacher, paper_student = torch.cat(seen["teacher"][2:]), torch.cat(seen["student"][2:])
    assert torch.equal(paper_teacher, paper_student)
    images = sorted((tmp_path / "data" / "oxford-iiit-pet" / "images").iterdir(), key=lambda p: p.stem[-3:])
    reference = torch.stack([reference_paper_transform(64)(Image.open(p).convert("RGB")) for p in images])
    assert torch.equal(paper_teacher, reference)

    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    paper = [e for e in saved["entries"] if e["protocol"] == "paper"]
    assert [e["model"] for e in paper] == ["teacher", "student"]
    for entry in paper:
        assert entry["templates"] == ["a photo of a {c}, a type of pet."]
        assert entry["precision"] == "fp32"
        assert entry["headline_metric"] == "top1" and entry["headline"] == entry["top1"]
        assert entry["preprocessing"]["interpolation"] == "bilinear"
        assert entry["preprocessing"]["mean"] == list(CLIP_MEAN)
    clip_benchmark = results.entry("pets", "student", "clip_benchmark")
    assert clip_benchmark.precision == "bf16" and clip_benchmark.headline_metric == "mean_per_class_recall"
    assert clip_benchmark.templates == list(get_dataset("pets").templates)
    assert clip_benchmark.preprocessing["image_size"] == 48
    markdown = (tmp_path / "eval" / "results.md").read_text()
    assert (
        "| pets | paper | student | 7 |" in markdown and "| pets | clip_benchmark | student | 7 |" in markdown
    )
    assert "paper: the authors' protocol" in markdown
    summary = results.to_dict()
    assert summary["paper/pets/student/top1"] == round(results.entry("pets", "student", "paper").top1, 4)
    assert "pets/student/mean_per_class_recall" in summary


def clip_benchmark_top1(logits: torch.Tensor, target: torch.Tensor) -> float:
    """The body of CLIP_benchmark's ``accuracy()`` for top-1 (its last line fails under NumPy >= 2.4)."""
    pred = logits.topk(5 if logits.shape[1] >= 5 else 1, 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return correct[:1].reshape(-1).float().sum().item() / len(target)


ANIMALS = ["red fox", "grey wolf", "house cat", "brown bear", "barn owl", "sea otter"]
TEMPLATES = ["a photo of a {c}.", "a blurry photo of a {c}."]


def clip_benchmark_logits(teacher, folder: Path, classes, templates, amp: bool, head=None):
    """CLIP_benchmark's own WebDataset reader, head (unless given) and classification pass (its CLI's
    batching): returns the head (D, C), logits (N, C) and labels (N,)."""
    from clip_benchmark.datasets.builder import build_wds_dataset
    from clip_benchmark.metrics import zeroshot_classification as cb

    dataset = build_wds_dataset(folder.name, transform=teacher.preprocess_val, data_dir=str(folder))
    if head is None:
        head = cb.zero_shot_classifier(teacher.model, teacher.tokenizer, classes, templates, "cpu", amp=amp)
    loader = torch.utils.data.DataLoader(dataset.batched(4), batch_size=None)
    return head, *cb.run_classification(teacher.model, head, loader, "cpu", amp=amp)


def test_clip_benchmark_protocol_in_bf16_equals_clip_benchmark_amp(tmp_path, tiny_teacher):
    """CPU bf16 autocast over CLIP_benchmark's scope: its head, its logits, its metrics, bit for bit."""
    from sklearn.metrics import balanced_accuracy_score

    write_mirror(tmp_path / "first", [0] * 12, ANIMALS, TEMPLATES)
    _, logits, _ = clip_benchmark_logits(tiny_teacher, tmp_path / "first", ANIMALS, TEMPLATES, amp=True)
    predicted = logits.argmax(1).tolist()  # even images labelled as predicted: top-1 at least 1/2
    labels = [p if i % 2 == 0 else (p + 1 + i) % len(ANIMALS) for i, p in enumerate(predicted)]
    write_mirror(tmp_path / "animals", labels, ANIMALS, TEMPLATES)
    their_head, their_logits, target = clip_benchmark_logits(
        tiny_teacher, tmp_path / "animals", ANIMALS, TEMPLATES, amp=True
    )

    heads = tmp_path / "heads"
    head = cached_zero_shot_head(tiny_teacher, ANIMALS, TEMPLATES, heads, "animals", torch.bfloat16)
    assert torch.equal(head, their_head.float())
    test_set = image_folder_test_set(tmp_path / "animals")
    encoder = Encoder("teacher", tiny_teacher.model.encode_image, 0, tiny_teacher.preprocessing)

    def our_logits(head, amp_dtype):
        outputs = zero_shot_pass(
            test_set,
            head,
            [encoder],
            [tiny_teacher.preprocess_val],
            amp_dtype=amp_dtype,
            device=torch.device("cpu"),
            batch_size=4,
        )
        assert torch.equal(outputs.labels, target)
        return outputs.logits["teacher"]

    assert torch.equal(our_logits(head, torch.bfloat16), their_logits)
    fp32_head = cached_zero_shot_head(tiny_teacher, ANIMALS, TEMPLATES, None)
    assert not torch.equal(our_logits(fp32_head, torch.bfloat16), their_logits)  # the head's scope matters
    assert not torch.equal(our_logits(fp32_head, None), their_logits)

    settings = config(
        tmp_path, image_folder=str(tmp_path / "animals"), precision="bf16", head_cache=str(heads)
    )
    ours = evaluate(settings, tmp_path / "e", teacher="tiny").entry("animals", "teacher")
    assert ours.precision == "bf16"
    assert ours.top1 == clip_benchmark_top1(their_logits, target) >= 0.5
    expected_recall = balanced_accuracy_score(target.numpy(), their_logits.argmax(1).numpy())
    assert ours.mean_per_class_recall == pytest.approx(expected_recall, abs=1e-12)


def test_top1_ties_follow_clip_benchmark(tmp_path, tiny_teacher):
    """A head with two equal columns ties wherever the matmul rounds both alike: top-1 is then topk's
    first index, as in CLIP_benchmark's accuracy(), which is not always argmax's; mean per-class
    recall uses argmax, as CLIP_benchmark's does. Same head, same logits, same numbers."""
    from sklearn.metrics import balanced_accuracy_score

    classes = ["red fox", *ANIMALS]  # classes 0 and 1 are both "red fox"
    templates = TEMPLATES[:1]
    heads = tmp_path / "heads"
    head = cached_zero_shot_head(tiny_teacher, classes, templates, heads, "animals")
    assert torch.equal(head[:, 0], head[:, 1])
    write_mirror(tmp_path / "first", [0] * 40, classes, templates)
    _, logits, _ = clip_benchmark_logits(tiny_teacher, tmp_path / "first", classes, templates, False, head)
    tied = logits.argmax(1) <= 1  # the best class is the pair
    labels = [1 if t else 2 for t in tied.tolist()]  # the second of the pair: argmax never says 1
    write_mirror(tmp_path / "animals", labels, classes, templates)
    _, logits, target = clip_benchmark_logits(
        tiny_teacher, tmp_path / "animals", classes, templates, False, head
    )
    their_top1 = clip_benchmark_top1(logits, target)
    assert (logits[:, 0] == logits[:, 1]).any()
    assert their_top1 != (logits.argmax(1) == target).float().mean().item()  # the tie rule matters here

    settings = config(tmp_path, image_folder=str(tmp_path / "animals"), head_cache=str(heads))
    ours = evaluate(settings, tmp_path / "eval", teacher="tiny").entry("animals", "teacher")
    assert ours.top1 == their_top1
    expected_recall = balanced_accuracy_score(target.numpy(), logits.argmax(1).numpy())
    assert ours.mean_per_class_recall == pytest.approx(expected_recall, abs=1e-12)


def test_validation_top1_on_a_fake_test_set_and_none_when_it_is_missing(tmp_path, tiny_teacher, caplog):
    write_pets(tmp_path / "data", [0, 5, 36, 5, 9, 2, 7, 1])
    student_dir = save_student(
        create_student("tiny", 32, preprocessing=tiny_teacher.preprocessing, teacher="tiny"), tmp_path / "s"
    )
    student = load_student(student_dir).train()
    for protocol in ("paper", "clip_benchmark"):
        settings = config(tmp_path / "data", datasets=["pets"], protocols=[protocol], with_teacher=False)
        expected = evaluate(settings, tmp_path / protocol, student_dir=student_dir).entry(
            "pets", "student", protocol
        )
        top1 = zero_shot_top1(
            student,
            tiny_teacher.preprocessing,
            tiny_teacher,
            "pets",
            tmp_path / "data",
            protocol,
            batch_size=3,
        )
        assert top1 == expected.top1
        assert student.training  # handed back in its own mode

    with caplog.at_level(logging.WARNING):
        missing = zero_shot_top1(
            student, tiny_teacher.preprocessing, tiny_teacher, "flowers102", tmp_path / "data"
        )
    assert missing is None
    (record,) = [r for r in caplog.records if "flowers102" in r.getMessage()]
    assert "Validation on 'flowers102' skipped" in record.getMessage()


def test_the_paper_recipes_evaluate_with_both_protocols():
    from synthdistill.config import load_recipe
    from synthdistill.registry import list_datasets

    configs = Path(__file__).resolve().parents[1] / "configs"
    for name in [*list_datasets(), "datacomp_medium", "imagenet", "synthci30m"]:
        assert load_recipe(configs / f"{name}.yaml").evaluate.protocols == ["clip_benchmark", "paper"], name
