"""Every shipped recipe loads and validates, and says what the paper says."""

from pathlib import Path

import pytest

from synthdistill.config import load_recipe
from synthdistill.registry import list_datasets, resolve_domain

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
STUDENTS = sorted((CONFIGS / "students").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem or recipe.name == "smoke"
    domain = resolve_domain(recipe.dataset, recipe.classes_file, recipe.superclass)
    assert domain.num_classes > 0


def test_one_paper_recipe_per_dataset():
    assert {p.stem for p in RECIPES} >= set(list_datasets())
    for name in list_datasets():
        recipe = load_recipe(CONFIGS / f"{name}.yaml")
        assert recipe.dataset == name and recipe.evaluate.datasets == [name]
        teacher = (recipe.distill.teacher, recipe.distill.teacher_pretrained)
        assert teacher == ("ViT-B-32", "datacomp_xl_s13b_b90k")
        assert (recipe.distill.loss, recipe.distill.epochs, recipe.distill.batch_size) == ("fd", 96, 256)
        assert recipe.distill.lr == 5e-4
        generate = recipe.generate
        assert (generate.steps, generate.guidance, generate.resolution, generate.precision) == (
            6,
            0.5,
            1024,
            "fp16",
        )
        assert (generate.scheduler, generate.prompt_weighting, generate.store_size) == ("lcm", "compel", 512)


@pytest.mark.parametrize("path", STUDENTS, ids=lambda p: p.stem)
def test_student_overlays(path):
    recipe = load_recipe([CONFIGS / "pets.yaml", path])
    assert recipe.distill.student == path.stem
    assert recipe.name == f"pets-{path.stem}"
    assert recipe.dataset == "pets"


def test_smoke_recipe_uses_tiny_models_and_its_class_file():
    recipe = load_recipe(CONFIGS / "smoke.yaml")
    assert recipe.generate.model == recipe.distill.teacher == recipe.distill.student == "tiny"
    assert Path(recipe.classes_file).is_file()
    assert resolve_domain(None, recipe.classes_file, recipe.superclass).num_classes == 5
