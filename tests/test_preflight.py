"""A run checks every model and test set it needs before any stage starts, and names all the missing."""

import os
from pathlib import Path

import pytest

from synthdistill.config import load_recipe
from synthdistill.errors import SynthdistillError
from synthdistill.pipeline import run_pipeline
from synthdistill.preflight import check_inputs
from synthdistill.registry import resolve_domain

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGES = ("prompts", "generate", "distill", "evaluate", "export")


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_paper_recipe_offline_lists_every_missing_input_with_its_key_before_any_stage(
    tmp_path, offline_empty_cache
):
    run = tmp_path / "run"
    data = tmp_path / "data"
    recipe = load_recipe(
        CONFIGS / "pets.yaml",
        [
            f"run_dir={run}",
            "distill.init=null",
            f"evaluate.data_root={data}",
            "generate.filter=teacher",
            "generate.vae=madebyollin/sdxl-vae-fp16-fix",
        ],
    )
    with pytest.raises(SynthdistillError) as refused:
        run_pipeline(recipe, echo=lambda _: None)
    message = str(refused.value)
    for key, name in [
        ("prompts.llm", "meta-llama/Llama-2-7b-chat-hf"),
        ("generate.model", "stabilityai/stable-diffusion-xl-base-1.0"),
        ("generate.lora", "latent-consistency/lcm-lora-sdxl"),
        ("generate.vae", "madebyollin/sdxl-vae-fp16-fix"),
        ("distill.teacher_pretrained", "datacomp_xl_s13b_b90k"),
        ("generate.filter_pretrained", "openai"),
    ]:
        assert f"{key} '{name}' is not in the local cache" in message and f"{key}=PATH" in message
    assert "test set 'pets'" in message and "evaluate.download=true" in message
    assert "7 inputs missing" in message
    assert not (run / "manifest.json").exists() and not (run / "config.yaml").exists()


def test_the_command_line_names_set_keys_and_the_api_recipe_keys(tmp_path, offline_empty_cache):
    from synthdistill.cli.common import cli_style

    recipe = load_recipe(CONFIGS / "pets.yaml", ["distill.init=null", f"evaluate.data_root={tmp_path}"])
    with pytest.raises(SynthdistillError) as refused:
        check_inputs(recipe, resolve_domain("pets", None, None), ["distill"])
    assert refused.value.render(cli_style({})).endswith(
        "pass a local open_clip checkpoint file with --set distill.teacher_pretrained=PATH."
    )


def test_tiny_models_and_local_paths_pass_and_a_missing_local_path_is_named(tmp_path, offline_empty_cache):
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"weights")
    model = tmp_path / "sd"
    model.mkdir()
    recipe = load_recipe(CONFIGS / "smoke.yaml", [f"generate.model={model}", f"generate.lora={lora}"])
    domain = resolve_domain(recipe.dataset, recipe.classes_file, recipe.superclass)
    check_inputs(recipe, domain, STAGES)
    check_inputs(load_recipe(CONFIGS / "smoke.yaml"), domain, STAGES)
    recipe.distill.init = str(tmp_path / "no-such-student")
    with pytest.raises(
        SynthdistillError, match=r"1 input missing: distill.init '.*no-such-student' does not"
    ):
        check_inputs(recipe, domain, STAGES)


def test_cached_models_with_the_hub_unreachable_switch_offline_mode_on(tmp_path, monkeypatch):
    from huggingface_hub import constants

    import synthdistill.preflight as preflight

    cache = tmp_path / "hub"
    repo = cache / "models--org--sd"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "model_index.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(preflight, "HUB_HOST", "hub.invalid")  # a name that never resolves
    recipe = load_recipe(CONFIGS / "smoke.yaml", ["generate.model=org/sd"])
    domain = resolve_domain(recipe.dataset, recipe.classes_file, recipe.superclass)
    check_inputs(recipe, domain, ["generate"], cache_dir=cache)
    assert constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"


def test_finished_stages_need_nothing(tmp_path, offline_empty_cache):
    recipe = load_recipe(CONFIGS / "pets.yaml", ["distill.init=null", f"evaluate.data_root={tmp_path}"])
    check_inputs(recipe, resolve_domain("pets", None, None), ["export"])
