"""Tiny random models, built without any download, behind the reserved model name ``tiny``.

The tests and ``configs/smoke.yaml`` run every stage's real code path with these: an open_clip
CLIP from a registered model config (with open_clip's real BPE tokenizer), and a timm ``test_*``
student. Weights are random but seeded, so every process that builds ``tiny`` gets the same model.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

TINY = "tiny"
TINY_SEED = 0
TINY_CLIP_NAME = "synthdistill-tiny-clip"
TINY_STUDENT_TIMM_NAME = "test_efficientnet"
TINY_IMAGE_SIZE = 64

_registered = False


def is_tiny(name: str | None) -> bool:
    return name == TINY


def register_tiny_clip_config() -> str:
    """Make the tiny CLIP config known to open_clip's factory; returns its model name."""
    global _registered
    if not _registered:
        import open_clip

        config = resources.files("synthdistill") / "tiny_configs" / f"{TINY_CLIP_NAME}.json"
        with resources.as_file(config) as path:
            open_clip.add_model_config(path)
        _registered = True
    return TINY_CLIP_NAME


def create_tiny_clip():
    """(model, preprocess_train, preprocess_val) of the seeded tiny CLIP, through open_clip's factory."""
    import open_clip

    name = register_tiny_clip_config()
    with torch.random.fork_rng(devices=[]), _quiet_root_logger():
        torch.manual_seed(TINY_SEED)
        return open_clip.create_model_and_transforms(name, pretrained=None)


@contextmanager
def _quiet_root_logger():
    """Silence open_clip's "no pretrained weights" warning: for ``tiny`` random weights are the point."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


TINY_SDXL = "tiny-sdxl"
TINY_DIFFUSION_NAMES = (TINY, TINY_SDXL)
TINY_DIFFUSION_IMAGE_SIZE = 64
_TINY_TEXT_WIDTH = 32


@lru_cache(maxsize=1)
def create_tiny_clip_tokenizer():
    """CLIP's real BPE tokenizer (49,408 tokens) as a transformers ``CLIPTokenizer``, without a download.

    Built from the merges file that ships with open_clip, written as the vocab.json/merges.txt pair
    transformers reads, so prompts tokenize (and are cut at 77 tokens) exactly as in Stable Diffusion.
    """
    import gzip
    import json
    import tempfile

    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.decompress(Path(default_bpe()).read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def _tiny_text_config(tokenizer):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TINY_TEXT_WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=_TINY_TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae():
    """A 4-level VAE, so latents are 1/8 of the image side as in Stable Diffusion (64 px -> 8)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=TINY_DIFFUSION_IMAGE_SIZE,
    )


def _tiny_unet(**extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=TINY_DIFFUSION_IMAGE_SIZE // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8,
        **extra,
    )


def create_tiny_diffusion_pipeline(name: str = TINY):
    """A seeded tiny random text-to-image pipeline: 'tiny' is SD-style, 'tiny-sdxl' SDXL-style.

    Real diffusers components from small configs (UNet, 4-level VAE, CLIP text encoder(s) with CLIP's
    tokenizer, LCM scheduler) producing 64 px images; every process gets the same weights.
    """
    from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if name not in TINY_DIFFUSION_NAMES:
        raise ValueError(f"Unknown tiny diffusion model '{name}'; use one of {TINY_DIFFUSION_NAMES}.")
    tokenizer = create_tiny_clip_tokenizer()
    text_config = _tiny_text_config(tokenizer)
    scheduler = LCMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        vae, text_encoder = _tiny_vae(), CLIPTextModel(text_config)
        if name == TINY:
            unet = _tiny_unet(cross_attention_dim=_TINY_TEXT_WIDTH, attention_head_dim=2)
            return StableDiffusionPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        time_embed_dim = 8  # SDXL conditions on 6 size/crop numbers, each embedded to this width
        unet = _tiny_unet(
            cross_attention_dim=2 * _TINY_TEXT_WIDTH,  # both encoders' hidden states, concatenated
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=_TINY_TEXT_WIDTH + 6 * time_embed_dim,
        )
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=CLIPTextModelWithProjection(text_config),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )


TINY_LLM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def create_tiny_llm_tokenizer():
    """A byte-level tokenizer built in code (256 byte tokens + <pad>, <s>, </s>) with a chat template.

    No merges, so any text (any language, any symbol) tokenizes, one token per UTF-8 byte; padding is
    on the left, as batched generation needs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        chat_template=TINY_LLM_CHAT_TEMPLATE,
    )


def create_tiny_llm():
    """(model, tokenizer): a seeded 2-layer random Llama (hidden size 32) and its byte-level tokenizer.

    Its answers are gibberish, which is what the tests need: every answer goes through the prompt
    stage's retry-and-replace path. Every process gets the same weights.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = create_tiny_llm_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer
