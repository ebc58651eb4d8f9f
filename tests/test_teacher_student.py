import pytest
import torch

from synthdistill.errors import SynthdistillError
from synthdistill.student import create_student, load_student, save_student
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


def test_student_folder_without_weights_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SynthdistillError, match="model.safetensors"):
        load_student(tmp_path)
