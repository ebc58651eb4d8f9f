import math
from pathlib import Path

import pytest
import torch

from synthdistill.errors import SynthdistillError
from synthdistill.losses import LossSettings, WeightedLoss, caption_ids, parse_loss_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Two classes in 2-D: class 0 is the x axis, class 1 the y axis.
CLASS_TEXT = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def loss(spec: str, **settings) -> WeightedLoss:
    return WeightedLoss(spec, LossSettings(**settings))


@pytest.mark.parametrize(
    "variant, expected",
    [
        ("distance", math.sqrt(0.8)),  # s = (0.6, 0.8) after normalising, t = (1, 0): sqrt(0.4^2 + 0.8^2)
        ("squared", 0.8),  # 0.4^2 + 0.8^2 = 2 - 2 * 0.6
        ("l2", 0.8),  # the old name of squared
        ("cosine", 0.4),  # 1 - 0.6
        ("mse", 10.0),  # unnormalised: ((3 - 1)^2 + (4 - 0)^2) / 2
    ],
)
def test_feature_distillation_by_hand(variant, expected):
    student, teacher = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])
    assert loss("fd", fd_variant=variant)(student, teacher).item() == pytest.approx(expected)


def test_feature_distillation_default_is_the_authors_distance_averaged_over_the_batch():
    student = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # cos with (1, 0): 0.6 and 0
    teacher = torch.tensor([[1.0, 0.0], [5.0, 0.0]])
    assert LossSettings().fd_variant == "distance"
    assert loss("fd")(student, teacher).item() == pytest.approx((math.sqrt(0.8) + math.sqrt(2.0)) / 2)
    squared = loss("fd", fd_variant="squared")(student, teacher).item()
    assert squared == pytest.approx((0.8 + 2.0) / 2)


def test_distance_gradient_by_hand():
    # d = ||s^ - t^|| with s^ = s / |s|: grad_s d = (I - s^ s^T) (s^ - t^) / (|s| d).
    # s = (3, 4), t = (1, 0): (I - s^ s^T) (-0.4, 0.8) = (-0.64, 0.48); / (5 sqrt(0.8)).
    student = torch.tensor([[3.0, 4.0]], requires_grad=True)
    loss("fd", fd_variant="distance")(student, torch.tensor([[1.0, 0.0]])).backward()
    expected = torch.tensor([[-0.128, 0.096]]) / math.sqrt(0.8)
    assert torch.allclose(student.grad, expected, atol=1e-6)


def test_distance_gradient_where_student_equals_teacher_is_zero_not_nan():
    student = torch.tensor([[2.0, 0.0], [3.0, 4.0]], requires_grad=True)
    teacher = torch.tensor([[1.0, 0.0], [6.0, 8.0]])  # the same directions: s^ = t^
    value = loss("fd", fd_variant="distance")(student, teacher)
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(student.grad, torch.zeros(2, 2))


def test_vision_language_is_clips_symmetric_loss_by_hand():
    # images on the axes, one of each class, scale 1: logits = identity; each row and column
    # gives -log(e / (e + 1)) = log(1 + 1/e).
    student, labels = torch.tensor([[2.0, 0.0], [0.0, 5.0]]), torch.tensor([0, 1])
    value = loss("vl", logit_scale=1.0)(student, student, labels, CLASS_TEXT).item()
    assert value == pytest.approx(math.log(1 + 1 / math.e), rel=1e-6)


def test_multi_positive_counts_every_same_class_text_as_positive_by_hand():
    # labels (0, 0, 1), scale 1. Rows 0 and 1: logits (1, 1, 0), target (1/2, 1/2, 0)
    # -> log(2 + 1/e); row 2: logits (0, 0, 1), target (0, 0, 1) -> log(1 + 2/e).
    student = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    value = loss("mpc", logit_scale=1.0)(student, student, labels, CLASS_TEXT).item()
    expected = (2 * math.log(2 + 1 / math.e) + math.log(1 + 2 / math.e)) / 3
    assert value == pytest.approx(expected, rel=1e-6)


def test_vl_and_mpc_differ_only_when_a_class_repeats():
    student = torch.randn(4, 2)
    distinct, repeated = torch.tensor([0, 1]), torch.tensor([0, 0, 1, 1])
    vl_distinct = loss("vl", logit_scale=1.0)(student[:2], student[:2], distinct, CLASS_TEXT)
    mpc_distinct = loss("mpc", logit_scale=1.0)(student[:2], student[:2], distinct, CLASS_TEXT)
    # with distinct classes, mpc is vl's image->text half; vl also averages the text->image half
    logits = torch.nn.functional.normalize(student[:2], dim=-1) @ CLASS_TEXT[distinct].T
    image_to_text = torch.nn.functional.cross_entropy(logits, torch.arange(2))
    text_to_image = torch.nn.functional.cross_entropy(logits.T, torch.arange(2))
    assert mpc_distinct.item() == pytest.approx(image_to_text.item(), rel=1e-6)
    assert vl_distinct.item() == pytest.approx((image_to_text + text_to_image).item() / 2, rel=1e-6)
    vl_repeated = loss("vl", logit_scale=1.0)(student, student, repeated, CLASS_TEXT)
    mpc_repeated = loss("mpc", logit_scale=1.0)(student, student, repeated, CLASS_TEXT)
    assert abs(vl_repeated.item() - mpc_repeated.item()) > 1e-3


def test_weighted_sum_of_terms():
    student, teacher = torch.randn(4, 2), torch.randn(4, 2)
    labels = torch.tensor([0, 1, 1, 0])
    fd = loss("fd")(student, teacher)
    vl = loss("vl", logit_scale=10.0)(student, teacher, labels, CLASS_TEXT)
    combined = loss("fd:1,vl:0.5", logit_scale=10.0)(student, teacher, labels, CLASS_TEXT)
    assert combined.item() == pytest.approx(fd.item() + 0.5 * vl.item(), rel=1e-6)
    assert loss("fd").needs_text is False and loss("fd:1,mpc:0.1").needs_text is True
    assert loss("i2i").needs_text is False


@pytest.mark.parametrize("alpha", [0.5, 0.25])
def test_the_authors_mix_of_fd_and_vl_by_hand(alpha):
    # (1 - alpha) FD + alpha VL at the authors' logit scale 1. FD (distance): image 0's student is
    # the x axis, its teacher (0.6, 0.8): sqrt(0.4^2 + 0.8^2); image 1 matches: 0. VL: log(1 + 1/e).
    student, labels = torch.tensor([[2.0, 0.0], [0.0, 5.0]]), torch.tensor([0, 1])
    teacher = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    spec = f"fd:{1 - alpha},vl:{alpha}"
    value = loss(spec, logit_scale=1.0)(student, teacher, labels, CLASS_TEXT).item()
    expected = (1 - alpha) * math.sqrt(0.8) / 2 + alpha * math.log(1 + 1 / math.e)
    assert value == pytest.approx(expected, rel=1e-6)


def test_image_to_image_is_symmetric_infonce_against_the_teacher_images_by_hand():
    # scale 1, student images both on the x axis, teachers on x and y: logits [[1, 0], [1, 0]].
    # rows (student -> teacher): log(1 + 1/e) and log(1 + e); columns: [[1, 1], [0, 0]]: log 2 twice.
    student = torch.tensor([[3.0, 0.0], [1.0, 0.0]])
    teacher = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    value = loss("i2i", logit_scale=1.0)(student, teacher).item()
    rows = (math.log(1 + 1 / math.e) + math.log(1 + math.e)) / 2
    assert value == pytest.approx((rows + math.log(2)) / 2, rel=1e-6)


def test_caption_ids_are_equal_exactly_for_equal_captions():
    ids = caption_ids(["a dog", "a cat", "a dog", "a dog "]).tolist()
    assert ids[0] == ids[2] and len({ids[0], ids[1], ids[3]}) == 3
    assert ids == caption_ids(["a dog", "a cat", "a dog", "a dog "]).tolist()  # as on every rank


def test_text_ids_decide_mpc_positives():
    # the same texts per image; ids saying images 0 and 1 share a caption make them positives
    student = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 2])
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    shared = loss("mpc", logit_scale=1.0)(student, student, labels, texts, text_ids=torch.tensor([7, 7, 9]))
    by_labels = loss("mpc", logit_scale=1.0)(student, student, torch.tensor([0, 0, 1]), CLASS_TEXT)
    assert shared.item() == pytest.approx(by_labels.item(), rel=1e-6)


@pytest.mark.parametrize("start", [100.0, float(torch.tensor(math.log(100.0)).exp())])
def test_learnable_temperature_learns_from_a_clip_teachers_logit_scale(start):
    # a CLIP teacher's logit scale is exp(log 100) = 100.0000076 in fp32: a hair above the clamp
    learnable = loss("vl", logit_scale=start, learnable_temperature=True)
    (log_scale,) = learnable.parameters()
    # each image nearer the other class's text: a smaller scale lowers the loss, so the step goes down
    student, labels = torch.tensor([[0.2, 1.0], [1.0, 0.3]]), torch.tensor([0, 1])
    optimizer = torch.optim.AdamW(learnable.parameters(), lr=0.01, weight_decay=0.0)
    before = log_scale.item()
    learnable(student, student, labels, CLASS_TEXT).backward()
    assert log_scale.grad is not None and log_scale.grad.abs().item() > 0
    optimizer.step()
    learnable.clamp_temperature_()
    assert log_scale.item() < before


def test_temperature_is_fixed_or_learnable_and_clamped_like_clip():
    fixed = loss("vl", logit_scale=50.0)
    assert not list(fixed.parameters())
    learnable = loss("mpc", logit_scale=200.0, learnable_temperature=True)
    (log_scale,) = learnable.parameters()
    assert log_scale.item() == pytest.approx(math.log(100.0))  # starts inside the clamp
    with torch.no_grad():
        log_scale.fill_(math.log(300.0))  # as an optimiser step past the clamp would
    student, labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    at_100 = loss("mpc", logit_scale=100.0)(student, student, labels, CLASS_TEXT)
    assert learnable(student, student, labels, CLASS_TEXT).item() == pytest.approx(at_100.item())
    learnable.clamp_temperature_()
    assert log_scale.item() == pytest.approx(math.log(100.0))


def test_vl_ablation_overlay_sets_the_authors_vl_loss_and_logit_scale():
    from synthdistill.config import load_recipe

    recipe = load_recipe([CONFIGS / "pets.yaml", CONFIGS / "ablations" / "vl.yaml"])
    assert (recipe.distill.loss, recipe.distill.logit_scale, recipe.name) == ("vl", 1.0, "pets-vl")
    assert load_recipe(CONFIGS / "pets.yaml").distill.logit_scale is None  # default: the teacher's


def test_loss_spec_parsing_and_errors():
    assert parse_loss_spec("fd") == [("fd", 1.0)]
    assert parse_loss_spec(" fd:1, vl:0.5 ") == [("fd", 1.0), ("vl", 0.5)]
    for spec, message in [
        ("kd", "Unknown loss 'kd'"),
        ("fd:0.5,i2j:0.5", "use fd, vl, mpc, i2i"),
        ("fd:x", "not a number"),
        ("fd:-1", ">= 0"),
        ("fd,fd", "at most once"),
        ("", "at least one"),
    ]:
        with pytest.raises(SynthdistillError, match=message):
            parse_loss_spec(spec)
    with pytest.raises(SynthdistillError, match="fd variant"):
        loss("fd", fd_variant="l1")


@pytest.mark.parametrize("value", ["0", "-1", "100.5", "nan"])
def test_logit_scale_outside_clips_range_is_refused_before_any_model_loads(value):
    from synthdistill.config import ConfigError, load_recipe

    with pytest.raises(ConfigError, match=r"'distill.logit_scale' must be in \(0, 100\]"):
        load_recipe(overrides=[f"distill.logit_scale={value}"])
