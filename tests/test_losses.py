import math

import pytest
import torch

from synthdistill.errors import SynthdistillError
from synthdistill.losses import LossSettings, WeightedLoss, parse_loss_spec

# Two classes in 2-D: class 0 is the x axis, class 1 the y axis.
CLASS_TEXT = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def loss(spec: str, **settings) -> WeightedLoss:
    return WeightedLoss(spec, LossSettings(**settings))


@pytest.mark.parametrize(
    "variant, expected",
    [
        ("l2", 0.8),  # s = (0.6, 0.8) after normalising, t = (1, 0): 0.4^2 + 0.8^2 = 2 - 2 * 0.6
        ("cosine", 0.4),  # 1 - 0.6
        ("mse", 10.0),  # unnormalised: ((3 - 1)^2 + (4 - 0)^2) / 2
    ],
)
def test_feature_distillation_by_hand(variant, expected):
    student, teacher = torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 0.0]])
    assert loss("fd", fd_variant=variant)(student, teacher).item() == pytest.approx(expected)


def test_feature_distillation_averages_over_the_batch():
    student = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # cos with (1, 0): 0.6 and 0
    teacher = torch.tensor([[1.0, 0.0], [5.0, 0.0]])
    assert loss("fd")(student, teacher).item() == pytest.approx((0.8 + 2.0) / 2)


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


def test_temperature_is_the_teachers_or_learnable_and_clamped_like_clip():
    fixed = loss("vl", logit_scale=50.0)
    assert not list(fixed.parameters())
    learnable = loss("mpc", logit_scale=200.0, learnable_temperature=True)
    (log_scale,) = learnable.parameters()
    assert log_scale.item() == pytest.approx(math.log(200.0))
    student, labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    at_100 = loss("mpc", logit_scale=100.0)(student, student, labels, CLASS_TEXT)
    assert learnable(student, student, labels, CLASS_TEXT).item() == pytest.approx(at_100.item())


def test_loss_spec_parsing_and_errors():
    assert parse_loss_spec("fd") == [("fd", 1.0)]
    assert parse_loss_spec(" fd:1, vl:0.5 ") == [("fd", 1.0), ("vl", 0.5)]
    for spec, message in [
        ("kd", "Unknown loss 'kd'"),
        ("fd:x", "not a number"),
        ("fd:-1", ">= 0"),
        ("fd,fd", "at most once"),
        ("", "at least one"),
    ]:
        with pytest.raises(SynthdistillError, match=message):
            parse_loss_spec(spec)
    with pytest.raises(SynthdistillError, match="fd variant"):
        loss("fd", fd_variant="l1")
