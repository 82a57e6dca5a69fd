"""The embedded tiny world: SD3-architecture components built from configs, with no downloads.

Same diffusers/transformers classes and folder layout as stabilityai/stable-diffusion-3-medium-diffusers
(text_encoder_3 / tokenizer_3 = None, as SD3 allows) and alimama-creative/SD3-Controlnet-Inpainting.
"""

from __future__ import annotations

import string
from typing import Iterable

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from pipeline.config import Config

LATENT_CHANNELS = 16  # SD3's latent channels


def vae_scale(cfg: Config) -> int:
    return 2 ** (len(cfg.vae.block_out_channels) - 1)


def latent_size(cfg: Config) -> int:
    return cfg.data.image_size // vae_scale(cfg)


def build_vae(cfg: Config) -> AutoencoderKL:
    n = len(cfg.vae.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae.block_out_channels),
        layers_per_block=cfg.vae.layers_per_block,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=min(32, min(cfg.vae.block_out_channels)),
        sample_size=cfg.data.image_size,
        mid_block_add_attention=False,
        use_quant_conv=False,  # as SD3's VAE
        use_post_quant_conv=False,
        shift_factor=0.0,  # set from data by the vae stage
        scaling_factor=1.0,
    )


def train_tokenizer(corpus: Iterable[str], cfg: Config) -> CLIPTokenizer:
    """A CLIP BPE tokenizer trained on the prompt corpus. Every printable ASCII character is a word of
    its own in the training text, so any ASCII prompt tokenizes without unknown tokens."""
    from tokenizers import trainers
    from tokenizers.pre_tokenizers import ByteLevel

    tok = CLIPTokenizer(model_max_length=cfg.text.tokenizer_max_length)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.text.vocab_size,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        initial_alphabet=ByteLevel.alphabet(),
        show_progress=False,
    )
    chars = " ".join(string.printable.split())
    tok.backend_tokenizer.train_from_iterator([chars, *corpus], trainer)
    # Round-trip through the standard files so ids and post-processor agree with what users load.
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        tok = CLIPTokenizer.from_pretrained(tmp)
    if len(tok(" ".join(string.ascii_lowercase + string.digits + ",.!?"))["input_ids"]) < 2:
        raise RuntimeError("tokenizer training failed: the alphabet does not tokenize")
    return tok


def build_text_encoder(cfg: Config, tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModelWithProjection:
    """A frozen, randomly initialised CLIP text encoder: a fixed, distinct embedding per prompt, which the
    backbone learns to read (the tiny world does not train its text encoders)."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text.hidden_size,
        intermediate_size=cfg.text.hidden_size * 4,
        num_hidden_layers=cfg.text.num_hidden_layers,
        num_attention_heads=cfg.text.num_attention_heads,
        max_position_embeddings=cfg.text.tokenizer_max_length,
        projection_dim=cfg.text.projection_dim,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval().requires_grad_(False)


def transformer_kwargs(cfg: Config) -> dict:
    """Shared by backbone and ControlNets: the joint-attention width is the two CLIPs' hidden sizes side
    by side (SD3 pads them to T5's width), pooled = the two projections concatenated."""
    inner = cfg.backbone.num_attention_heads * cfg.backbone.attention_head_dim
    lat = latent_size(cfg)
    return dict(
        sample_size=lat,
        patch_size=cfg.backbone.patch_size,
        in_channels=LATENT_CHANNELS,
        attention_head_dim=cfg.backbone.attention_head_dim,
        num_attention_heads=cfg.backbone.num_attention_heads,
        joint_attention_dim=2 * cfg.text.hidden_size,
        caption_projection_dim=inner,
        pooled_projection_dim=2 * cfg.text.projection_dim,
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=lat // cfg.backbone.patch_size,
    )


def build_backbone(cfg: Config) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(num_layers=cfg.backbone.num_layers, **transformer_kwargs(cfg))


def build_controlnet(cfg: Config, num_layers: int) -> SD3ControlNetModel:
    return SD3ControlNetModel(
        num_layers=num_layers,
        extra_conditioning_channels=1,
        force_zeros_for_pooled_projection=True,  # as the alimama teacher: the pipeline feeds zero pooled
        **transformer_kwargs(cfg),
    )


def build_scheduler(cfg: Config) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.scheduler.shift)


def text_pipeline(components: dict) -> StableDiffusion3Pipeline:
    """An SD3 pipeline over the text components only, to call its own ``encode_prompt``."""
    return StableDiffusion3Pipeline(
        transformer=components["transformer"],
        scheduler=components["scheduler"],
        vae=components.get("vae"),
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        text_encoder_2=components["text_encoder_2"],
        tokenizer_2=components["tokenizer_2"],
        text_encoder_3=None,
        tokenizer_3=None,
    )


@torch.no_grad()
def encode_prompts(text_pipe: StableDiffusion3Pipeline, prompts: list[str], max_sequence_length: int,
                   device: torch.device | str = "cpu"):
    """(prompt_embeds, pooled_prompt_embeds) exactly as the stock SD3 pipelines compute them."""
    embeds, _, pooled, _ = text_pipe.encode_prompt(
        prompt=list(prompts), prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length, device=torch.device(device),
    )
    return embeds, pooled


def load_foundation(path, dtype=torch.float32, with_t5: bool | None = None) -> StableDiffusion3Pipeline:
    """The frozen foundation as an SD3 pipeline. Models in eval mode, without grad.

    ``with_t5``: None = load T5 (text_encoder_3 / tokenizer_3) when the folder ships one (the pretrained SD3
    profile: encode, evaluation and gates then embed prompts as the stock pipeline does); False = never
    (training, which reads cached embeddings). The tiny world ships none."""
    import json
    from pathlib import Path

    index = json.loads((Path(path) / "model_index.json").read_text())
    has_t5 = bool((index.get("text_encoder_3") or [None])[0])
    kw = {} if (has_t5 and with_t5 is not False) else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=dtype, **kw)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
