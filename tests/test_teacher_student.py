import os

import pytest
import torch

from synthdistill.errors import SynthdistillError
from synthdistill.identity import weights_identity
from synthdistill.student import (
    check_student,
    create_student,
    init_identity,
    load_init_weights,
    load_student,
    parameter_groups,
    save_student,
)
from synthdistill.teacher import load_teacher


def test_tiny_teacher_is_the_same_in_every_process(tiny_teacher):
    again = load_teacher("tiny")
    for a, b in zip(tiny_teacher.model.state_dict().values(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_zero_shot_head_is_clips_template_ensemble(tiny_teacher):
    classes, templates = ["cat", "dog", "bird"], ["a photo of a {c}.", "a drawing of a {c}."]
    head = tiny_teacher.build_zero_shot_head(classes, templates)
    assert head.shape == (tiny_teacher.embed_dim, 3)
    for c, name in enumerate(classes):
        per_template = tiny_teacher.encode_texts([t.format(c=name) for t in templates])
        expected = per_template.mean(0) / per_template.mean(0).norm()
        assert torch.allclose(head[:, c], expected, atol=1e-6)
    assert torch.allclose(head.norm(dim=0), torch.ones(3), atol=1e-6)


def test_image_embeddings_are_normalised(tiny_teacher):
    embeddings = tiny_teacher.encode_images(torch.randn(3, 3, 64, 64))
    assert embeddings.shape == (3, tiny_teacher.embed_dim)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_unknown_models_suggest_names():
    with pytest.raises(SynthdistillError, match="Closest: ViT-B-32"):
        load_teacher("ViT-B-33", None)
    with pytest.raises(SynthdistillError, match="no pretrained tag 'nope'"):
        load_teacher("ViT-B-32", "nope")
    with pytest.raises(SynthdistillError, match="Unknown timm model"):
        create_student("tiny_vit_5m_225", 32)


def test_offline_teacher_weights_give_one_sentence():
    with pytest.raises(SynthdistillError, match="local checkpoint file"):
        load_teacher("RN50", "openai")


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_student_round_trip(tmp_path, tiny_teacher, head):
    student = create_student(
        "tiny", tiny_teacher.embed_dim, head=head, preprocessing=tiny_teacher.preprocessing, teacher="tiny"
    ).eval()
    images = torch.randn(2, 3, 64, 64)
    save_student(student, tmp_path / "student")
    loaded = load_student(tmp_path / "student")
    assert torch.allclose(student(images), loaded(images), atol=1e-6)
    assert loaded.config == student.config
    assert loaded.config.preprocessing.image_size == 64
    umask = os.umask(0)
    os.umask(umask)  # readable by group and others like any file the user writes (safetensors: 0600)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "student").iterdir()}
    assert modes == {"model.safetensors": 0o644 & ~umask, "config.json": 0o644 & ~umask}


def test_student_folder_without_weights_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SynthdistillError, match="model.safetensors"):
        load_student(tmp_path)


# ------------------------------------------------------------------- starting weights (distill.init)


def saved_tiny_student(directory, embed_dim: int = 32, seed: int = 3):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = create_student("tiny", embed_dim, teacher="tiny")
    save_student(student, directory)
    return student


def fresh_tiny_student(embed_dim: int = 32):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)
        return create_student("tiny", embed_dim, teacher="tiny")


def assert_same_weights(a, b):
    for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), key


def test_init_from_a_student_folder_gives_its_weights_bit_for_bit(tmp_path):
    saved = saved_tiny_student(tmp_path / "student")
    student = fresh_tiny_student()
    assert not torch.equal(student.head.proj.weight, saved.head.proj.weight)
    identity = load_init_weights(student, tmp_path / "student")
    assert_same_weights(student, saved)  # backbone and head
    assert identity == weights_identity(str(tmp_path / "student" / "model.safetensors"))
    saved_tiny_student(tmp_path / "moved")  # the same weights elsewhere: the same start
    assert init_identity(tmp_path / "moved") == identity
    saved_tiny_student(tmp_path / "other", seed=4)
    assert init_identity(tmp_path / "other") != identity


def test_init_from_a_checkpoint_folder_takes_the_student_part(tmp_path):
    from safetensors.torch import save_file

    saved = fresh_tiny_student()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        for parameter in saved.parameters():
            parameter.data.normal_()
    step = tmp_path / "checkpoints" / "step-00000007"
    step.mkdir(parents=True)
    weights = {f"student.{k}": v.contiguous() for k, v in saved.state_dict().items()}
    weights["loss.terms.vl.log_scale"] = torch.tensor(4.0)  # the checkpoint's loss state stays behind
    save_file(weights, str(step / "weights.safetensors"))
    for path in (step, tmp_path / "checkpoints"):  # the step folder, or the newest of checkpoints/
        student = fresh_tiny_student()
        load_init_weights(student, path)
        assert_same_weights(student, saved)


def test_init_of_another_width_is_refused_naming_both(tmp_path):
    saved_tiny_student(tmp_path / "student", embed_dim=16)
    with pytest.raises(SynthdistillError, match="width 16.*width 32"):
        load_init_weights(fresh_tiny_student(embed_dim=32), tmp_path / "student")
    with pytest.raises(SynthdistillError, match="width 16.*width 32"):  # before any model loads
        check_student("tiny", 32, init=tmp_path / "student")


def test_init_of_another_architecture_is_refused_naming_both(tmp_path):
    saved_tiny_student(tmp_path / "student")
    vit = create_student("test_vit", 32)
    with pytest.raises(SynthdistillError, match="'test_efficientnet' student.*'test_vit' student"):
        load_init_weights(vit, tmp_path / "student")


def test_checkpoint_init_of_another_width_is_refused_by_its_shapes(tmp_path):
    from safetensors.torch import save_file

    step = tmp_path / "step-00000001"
    step.mkdir()
    state = {f"student.{k}": v.contiguous() for k, v in fresh_tiny_student(16).state_dict().items()}
    save_file(state, str(step / "weights.safetensors"))
    with pytest.raises(
        SynthdistillError, match=r"'head.proj.weight' is \[16, .*\] in its weights \(width 16\)"
    ):
        load_init_weights(fresh_tiny_student(32), step)


def test_missing_unfinished_or_damaged_init_is_one_sentence(tmp_path):
    with pytest.raises(SynthdistillError, match="does not exist"):
        load_init_weights(fresh_tiny_student(), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SynthdistillError, match="holds neither model.safetensors nor weights.safetensors"):
        load_init_weights(fresh_tiny_student(), tmp_path / "empty")
    saved_tiny_student(tmp_path / "student")
    (tmp_path / "student" / "config.json").unlink()
    with pytest.raises(SynthdistillError, match="did not finish"):
        load_init_weights(fresh_tiny_student(), tmp_path / "student")
    saved_tiny_student(tmp_path / "damaged")
    (tmp_path / "damaged" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(SynthdistillError, match="cannot be read"):
        load_init_weights(fresh_tiny_student(), tmp_path / "damaged")


def test_init_and_student_pretrained_together_are_refused():
    from synthdistill.config import ConfigError, load_recipe

    with pytest.raises(ConfigError, match="both choose the student's start weights"):
        load_recipe(overrides=["distill.init=runs/x/student", "distill.student_pretrained=true"])
    assert load_recipe(overrides=["distill.student_pretrained=dist_in22k"]).distill.student_pretrained == (
        "dist_in22k"
    )
    assert load_recipe(overrides=["distill.student_pretrained=true"]).distill.student_pretrained is True


# ------------------------------------------------------------------- timm weights (student_pretrained)


def test_pretrained_tag_of_another_architecture_is_refused():
    with pytest.raises(
        SynthdistillError, match="tag of 'tiny_vit_11m_224', not of the student 'tiny_vit_5m_224'"
    ):
        create_student("tiny_vit_5m_224", 32, pretrained="tiny_vit_11m_224.dist_in22k")
    with pytest.raises(
        SynthdistillError, match="no pretrained tag 'nope' for 'test_vit'.*test_vit.r160_in1k"
    ):
        check_student("test_vit", 32, pretrained="nope")


def test_pretrained_weights_offline_give_one_sentence():
    # HF_HUB_OFFLINE=1 (conftest) and no timm weights in the cache; the full name and the bare tag alike
    for tag in (True, "r160_in1k", "test_efficientnet.r160_in1k"):
        with pytest.raises(SynthdistillError, match="network access, point HF_HUB_CACHE.*local weights file"):
            create_student("tiny", 32, pretrained=tag)


def test_pretrained_local_file_starts_the_trunk_from_it(tmp_path):
    from safetensors.torch import save_file

    source = fresh_tiny_student()
    save_file(
        {k: v.contiguous() for k, v in source.trunk.state_dict().items()}, str(tmp_path / "trunk.safetensors")
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        student = create_student("tiny", 32, pretrained=str(tmp_path / "trunk.safetensors"))
    assert_same_weights(student.trunk, source.trunk)
    with pytest.raises(SynthdistillError, match="does not exist"):
        create_student("tiny", 32, pretrained=str(tmp_path / "missing.safetensors"))


# ----------------------------------------------------------------------------- input size (image_size)


def test_image_size_builds_a_vit_for_that_size(tmp_path):
    student = create_student("test_vit", 32, image_size=96).eval()
    assert student.trunk.patch_embed.img_size == (96, 96)
    assert student.trunk.pos_embed.shape[1] == (96 // 16) ** 2 + student.trunk.num_prefix_tokens
    images = torch.randn(2, 3, 96, 96)
    save_student(student, tmp_path / "student")
    loaded = load_student(tmp_path / "student")  # rebuilt at its size from config.json
    assert loaded.trunk.patch_embed.img_size == (96, 96)
    assert torch.allclose(student(images), loaded(images), atol=1e-6)


def test_image_size_needs_nothing_for_a_convnet():
    student = create_student("tiny", 32, image_size=96).eval()
    assert student.config.preprocessing.image_size == 96
    assert student(torch.randn(2, 3, 96, 96)).shape == (2, 32)


def test_image_size_a_model_cannot_take_is_one_sentence():
    for check in (
        lambda: create_student("test_vit", 32, image_size=100),
        lambda: check_student("test_vit", 32, image_size=100),
    ):
        with pytest.raises(
            SynthdistillError, match="'test_vit' cannot take distill.image_size=100.*its size 160"
        ):
            check()


# ----------------------------------------------------------------------------- weight decay groups


def test_parameter_groups_keep_biases_norms_and_timms_exclusions_out_of_weight_decay():
    student = create_student("tiny_vit_5m_224", 32)
    groups = parameter_groups(student, 0.05)
    names = {id(p): n for n, p in student.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    biases = {n for n in names.values() if "attention_biases" in n}
    assert biases and biases <= no_decay  # 2-D, excluded by timm's no_weight_decay()
    assert {n for n in names.values() if n.endswith(".bias")} <= no_decay
    assert "head.proj.weight" in decay and "trunk.patch_embed.conv1.conv.weight" in decay
    optimizer = torch.optim.AdamW(groups, lr=1e-3)  # what the groups are for
    assert len(optimizer.param_groups) == 2


def test_a_student_whose_trunk_has_a_pre_logits_layer_projects_its_real_width():
    """timm's MobileNetV3 applies conv_head after pooling (960 -> 1280 features): the head must take 1280."""
    import torch

    from synthdistill.student import create_student

    student = create_student("mobilenetv3_large_100", 32)
    assert student.head.proj.in_features == student.trunk.head_hidden_size == 1280
    assert student(torch.randn(1, 3, 96, 96)).shape == (1, 32)
