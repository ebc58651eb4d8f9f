"""Compel prompt weighting (generate.prompt_weighting) on the tiny SD 1.x and SDXL pipelines."""

import json

import numpy as np
import pytest
import torch

from synthdistill.config import GenerateConfig
from synthdistill.generate import (
    PromptEncoder,
    generate_images,
    has_weighting_syntax,
    load_text2image_pipeline,
)
from synthdistill.shards import ShardSamples, decode_image, list_shards

PLAIN = "a photo of a cat"
SAME = "(a photo of a cat)1.0"
UPWEIGHTED = "a photo of a cat++++"


def config(model="tiny", **overrides):
    return GenerateConfig(model=model, lora=None, shard_size=8, batch_size=8, **overrides)


@pytest.fixture(scope="module")
def pipes():
    return {
        name: load_text2image_pipeline(config(name), torch.device("cpu")) for name in ("tiny", "tiny-sdxl")
    }


def draw(tmp_path, pipe, texts, model="tiny", **overrides):
    """Every text drawn with the same seed, in one batch: stored pixels as int arrays, in order."""
    tmp_path.mkdir(exist_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"class_index": 0, "class_name": "cat", "prompt": t, "seed": 11} for t in texts]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "shards"
    generate_images(prompts, out, config(model, **overrides), device="cpu", pipeline=pipe, force=True)
    samples = ShardSamples(list_shards(out))
    return [np.asarray(decode_image(samples[i].image), dtype=np.int16) for i in range(len(samples))]


def test_weighting_syntax_is_recognised():
    for plain in (PLAIN, "a dog, on a mat; at night: 50% off", "a 1.5 m tall man"):
        assert not has_weighting_syntax(plain), plain
    for weighted in (SAME, UPWEIGHTED, "A photo of a Bengal++++ (tabby++, pet), on a sofa", "(a cat)1.2"):
        assert has_weighting_syntax(weighted), weighted


@pytest.mark.parametrize("weighting", ["auto", "compel"])
def test_sd_unit_weight_draws_the_plain_prompts_image_and_upweighting_changes_it(tmp_path, pipes, weighting):
    plain, same, up = draw(tmp_path, pipes["tiny"], [PLAIN, SAME, UPWEIGHTED], prompt_weighting=weighting)
    assert np.array_equal(plain, same)
    assert np.abs(up - plain).mean() > 0.5  # the tiny UNet listens to its text only a little


def test_without_weighting_the_syntax_is_raw_text(tmp_path, pipes):
    plain, same = draw(tmp_path, pipes["tiny"], [PLAIN, SAME], prompt_weighting="none")
    assert np.abs(same - plain).mean() > 1


def test_sdxl_unit_weight_gives_the_plain_sequence_embeddings_and_its_own_pooled_one(pipes):
    """compel weights SDXL's per-token conditioning but pools the raw string (PAPER.md, Stage 2)."""
    pipe = pipes["tiny-sdxl"]
    ((_, weighted),) = PromptEncoder(pipe, "compel").inputs([PLAIN, SAME])
    embeds, pooled = weighted["prompt_embeds"], weighted["pooled_prompt_embeds"]
    assert embeds.shape == (2, 77, 64) and pooled.shape == (2, 32)
    assert torch.equal(embeds[0], embeds[1])
    assert not torch.allclose(pooled[0], pooled[1])
    # compel on a plain prompt is exactly the pipeline's own encoding of it
    own, _, own_pooled, _ = pipe.encode_prompt(PLAIN, device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(embeds[0:1], own) and torch.equal(pooled[0:1], own_pooled)


def test_sdxl_upweighting_changes_the_image(tmp_path, pipes):
    plain, up = draw(tmp_path, pipes["tiny-sdxl"], [PLAIN, UPWEIGHTED], model="tiny-sdxl")
    assert np.abs(up - plain).mean() > 1


def test_a_longer_conditioning_is_drawn_apart_so_batch_mates_keep_their_images(tmp_path, pipes):
    """A conjunction gives 154 conditioning tokens; padding the 77 of a batch-mate would change its image."""
    pipe = pipes["tiny"]
    conjunction = '("a photo of a cat", "on a sofa").and()'
    groups = PromptEncoder(pipe, "auto").inputs([conjunction, PLAIN])
    assert [(positions, inputs["prompt_embeds"].shape[1]) for positions, inputs in groups] == [
        ([0], 154),
        ([1], 77),
    ]
    together = draw(tmp_path / "together", pipe, [conjunction, PLAIN])
    alone = draw(tmp_path / "alone", pipe, [PLAIN])
    assert np.array_equal(together[1], alone[0])
