import pytest

from synthdistill.config import (
    ConfigError,
    RecipeConfig,
    config_hash,
    dump_recipe,
    load_recipe,
    valid_keys,
)


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_follow_the_paper():
    recipe = RecipeConfig()
    assert (recipe.distill.teacher, recipe.distill.teacher_pretrained) == (
        "ViT-B-32",
        "datacomp_xl_s13b_b90k",
    )
    assert (recipe.distill.lr, recipe.distill.batch_size, recipe.distill.epochs) == (5e-4, 256, 96)
    assert (recipe.generate.steps, recipe.generate.guidance) == (4, 1.0)


def test_recipe_sections_and_overrides(tmp_path):
    path = write(tmp_path, "dataset: dtd\ndistill:\n  student: efficientnet_b0\n  lr: 1.0e-3\n")
    recipe = load_recipe(path, ["distill.lr=1e-4", "generate.steps=8", "evaluate.datasets=pets,dtd"])
    assert recipe.dataset == "dtd"
    assert recipe.distill.student == "efficientnet_b0"
    assert recipe.distill.lr == pytest.approx(1e-4)
    assert recipe.generate.steps == 8
    assert recipe.evaluate.datasets == ["pets", "dtd"]
    assert recipe.name == "recipe"  # named after the file unless it says otherwise


def test_unknown_key_names_the_closest_valid_key_first(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_recipe(write(tmp_path, "distill:\n  lrr: 0.1\n"))
    message = str(error.value)
    assert "'distill.lrr'" in message
    assert message.index("distill.lr") < message.index("valid keys")
    assert message.split("valid keys: ")[1].startswith("distill.lr,")


def test_wrong_type_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="distill.epochs.*int"):
        load_recipe(None, ["distill.epochs=1.5"])
    with pytest.raises(ConfigError, match="must be a section"):
        load_recipe(write(tmp_path, "distill: 3\n"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(write(tmp_path, "distill: [unclosed\n"))


def test_choices_and_ranges_are_validated():
    with pytest.raises(ConfigError, match="prompts.generator"):
        load_recipe(None, ["prompts.generator=gpt"])
    with pytest.raises(ConfigError, match=r"prompts.per_class.*\[1, inf\)"):
        load_recipe(None, ["prompts.per_class=0"])


@pytest.mark.parametrize(
    "override",
    [
        "distill.grad_clip=-1",
        "distill.checkpoint_every=0",
        "distill.log_every=0",
        "distill.workers=-1",
        "distill.lr=0",
        "distill.lr=.nan",
        "distill.lr=.inf",
        "distill.image_size=0",
        "distill.aug_scale=[0.5,2]",
        "distill.aug_scale=[0,1]",
        "distill.aug_scale=[0.9,0.5]",
        "distill.aug_hflip=1.5",
        "generate.store_size=0",
        "generate.jpeg_quality=0",
        "generate.jpeg_quality=101",
        "generate.guidance=-0.5",
        "generate.resolution=4",
        "generate.resolution=516",
        "generate.steps=0",
        "generate.batch_size=0",
        "generate.shard_size=0",
        "prompts.llm_batch_size=0",
        "prompts.llm_max_new_tokens=0",
        "prompts.options_per_dimension=0",
        "prompts.llm_temperature=-0.1",
        "prompts.max_prompt_tokens=0",
        "distill.epochs=0",
        "distill.batch_size=0",
        "distill.weight_decay=-0.1",
        "distill.warmup_steps=-1",
        "distill.cache_views=0",
        "distill.train_num_samples=0",
        "distill.shuffle_buffer=-1",
        "distill.resampled=true",
        "evaluate.batch_size=0",
        "evaluate.workers=-1",
        "evaluate.max_images=0",
        "export.opset=17",
        "export.atol=0",
        "export.bench_repeats=0",
        "seed=-1",
    ],
)
def test_out_of_range_values_are_refused_before_any_work(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe(None, [override])


def test_in_range_edges_are_accepted():
    recipe = load_recipe(
        None,
        [
            "distill.grad_clip=null",
            "distill.aug_scale=[1,1]",
            "generate.jpeg_quality=100",
            "generate.guidance=0",
            "generate.resolution=520",
            "distill.warmup_steps=0",
            "distill.resampled=true",
            "distill.train_data=/data/{000..009}.tar",
            "distill.train_num_samples=1000",
        ],
    )
    assert recipe.distill.grad_clip is None and recipe.distill.aug_scale == [1.0, 1.0]
    assert recipe.generate.resolution == 520 and recipe.distill.resampled


def test_every_numeric_key_declares_its_range():
    import dataclasses
    import typing

    from synthdistill import config

    unbounded = []
    for section in ("", *config.STAGES):
        cls = config.RecipeConfig if not section else type(getattr(config.RecipeConfig(), section))
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            types = set(typing.get_args(hint)) or {hint}
            if types & {int, float} and not f.metadata.get("bounds"):
                unbounded.append(f"{section}.{f.name}".lstrip("."))
    assert unbounded == []


def test_a_range_key_needs_two_ordered_numbers():
    from synthdistill.config import check_field, option

    metadata = option([0.08, 1.0], "A crop's area range.", bounds="(0, 1]", ordered_pair=True).metadata
    check_field("distill.aug_scale", [0.08, 1.0], metadata)
    check_field("distill.aug_scale", [0.5, 0.5], metadata)
    for bad in ([1.0, 0.08], [0.5], [0.1, 0.5, 0.9]):
        with pytest.raises(ConfigError, match=r"distill\.aug_scale.*low <= high"):
            check_field("distill.aug_scale", bad, metadata)
    with pytest.raises(ConfigError, match=r"distill\.aug_scale.*\(0, 1\]"):
        check_field("distill.aug_scale", [0.0, 1.0], metadata)


def test_dumped_recipe_loads_back_identically(tmp_path):
    recipe = load_recipe(None, ["distill.lr=0.002", "generate.lora=null", "name=x"])
    again = load_recipe(write(tmp_path, dump_recipe(recipe)))
    assert again == recipe
    assert config_hash(again) == config_hash(recipe)
    assert config_hash(again.distill) != config_hash(load_recipe(None, ["distill.lr=0.003"]).distill)


def test_every_field_has_help():
    import dataclasses

    from synthdistill import config

    for cls in (
        config.PromptsConfig,
        config.GenerateConfig,
        config.DistillConfig,
        config.EvaluateConfig,
        config.ExportConfig,
    ):
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
    assert "distill.lr" in valid_keys()


def test_layered_recipes_are_named_after_their_files(tmp_path):
    base = write(tmp_path, "dataset: pets\ndistill:\n  student: tiny_vit_5m_224\n  lr: 1.0e-3\n", "pets.yaml")
    overlay = write(tmp_path, "distill:\n  student: efficientnet_b0\n", "efficientnet_b0.yaml")
    recipe = load_recipe([base, overlay])
    assert (recipe.dataset, recipe.distill.student, recipe.distill.lr) == ("pets", "efficientnet_b0", 1e-3)
    assert recipe.name == "pets-efficientnet_b0"
    assert load_recipe([base, overlay], ["name=mine"]).name == "mine"
