"""The embedded tiny world: SD3-architecture components built from configs, with no downloads; and the
one loader of a frozen foundation / ControlNet folder (the tiny world's or a materialised pretrained one).

Same diffusers/transformers classes and folder layout as stabilityai/stable-diffusion-3-medium-diffusers
(text_encoder_3 / tokenizer_3 = None, as SD3 allows) and alimama-creative/SD3-Controlnet-Inpainting.
Latent channels: ``LATENT_CHANNELS`` is only the tiny VAE's constructor input; everything built or run
after the VAE reads ``vae.config.latent_channels`` (or the transformer's ``in_channels``).
"""

from __future__ import annotations

import json
import string
from pathlib import Path
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
from pipeline.models.condition import extra_conditioning_channels

LATENT_CHANNELS = 16  # SD3's; the tiny VAE is built with it, the rest reads it from the VAE's config


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
    texts = [" ".join(c for c in string.printable if not c.isspace()), *corpus]
    specials = ["<|startoftext|>", "<|endoftext|>"]
    # tokenizers' BPE trainer gives the word-final tokens ("a</w>") ids in hash-map order, which differs
    # from run to run and breaks count ties between merges differently (huggingface/tokenizers#1794): listed
    # up front, they get fixed ids and the trained tokenizer is the same every run.
    bt = tok.backend_tokenizer
    words = {w for t in texts for w, _ in bt.pre_tokenizer.pre_tokenize_str(bt.normalizer.normalize_str(t))}
    word_final = [f"{c}</w>" for c in sorted({w[-1] for w in words})]
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.text.vocab_size,
        special_tokens=specials + word_final,
        end_of_word_suffix="</w>",
        initial_alphabet=ByteLevel.alphabet(),
        show_progress=False,
    )
    bt.train_from_iterator(texts, trainer)
    import json
    import tempfile

    # Round-trip through the standard files so ids and post-processor agree with what users load; the
    # word-final tokens are ordinary vocabulary, not added special tokens.
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        path = Path(tmp) / "tokenizer.json"
        spec = json.loads(path.read_text())
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in specials]
        path.write_text(json.dumps(spec, ensure_ascii=False))
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


def transformer_kwargs(cfg: Config, vae: AutoencoderKL) -> dict:
    """The backbone's config: latent channels and size from the VAE it denoises for; the joint-attention
    width is the two CLIPs' hidden sizes side by side (SD3 pads them to T5's width), pooled = the two
    projections concatenated."""
    inner = cfg.backbone.num_attention_heads * cfg.backbone.attention_head_dim
    lat = cfg.data.image_size // 2 ** (len(vae.config.block_out_channels) - 1)  # SD3's vae_scale_factor
    channels = vae.config.latent_channels
    return dict(
        sample_size=lat,
        patch_size=cfg.backbone.patch_size,
        in_channels=channels,
        attention_head_dim=cfg.backbone.attention_head_dim,
        num_attention_heads=cfg.backbone.num_attention_heads,
        joint_attention_dim=2 * cfg.text.hidden_size,
        caption_projection_dim=inner,
        pooled_projection_dim=2 * cfg.text.projection_dim,
        out_channels=channels,
        pos_embed_max_size=lat // cfg.backbone.patch_size,
    )


def build_backbone(cfg: Config, vae: AutoencoderKL) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(num_layers=cfg.backbone.num_layers, **transformer_kwargs(cfg, vae))


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
                   device: torch.device | str | None = None):
    """(prompt_embeds, pooled_prompt_embeds) exactly as the stock SD3 pipelines compute them, on ``device``
    (default: where the text encoders are)."""
    embeds, _, pooled, _ = text_pipe.encode_prompt(
        prompt=list(prompts), prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
        device=torch.device(device) if device is not None else text_pipe.text_encoder.device,
    )
    return embeds, pooled


def empty_prompt(text_pipe: StableDiffusion3Pipeline, max_sequence_length: int) -> dict[str, torch.Tensor]:
    """The empty prompt "" embedded by ``encode_prompts`` (T5 when the pipe has it): what the stock pipeline's
    classifier-free guidance uses as its negative prompt, and what ``drop_prompts`` substitutes.
    {"prompt_embeds": (T, D), "pooled_prompt_embeds": (P,)}, on the text encoders' device."""
    embeds, pooled = encode_prompts(text_pipe, [""], max_sequence_length)
    return {"prompt_embeds": embeds[0], "pooled_prompt_embeds": pooled[0]}


def drop_prompts(batch: dict, p: float, generator: torch.Generator, empty: dict) -> tuple:
    """Replace prompts by the empty prompt with probability p (classifier-free guidance training)."""
    embeds, pooled = batch["prompt_embeds"], batch["pooled_prompt_embeds"]
    if p <= 0:
        return embeds, pooled
    drop = (torch.rand(len(embeds), generator=generator) < p).to(embeds.device)
    embeds = torch.where(drop[:, None, None], empty["prompt_embeds"].to(embeds), embeds)
    pooled = torch.where(drop[:, None], empty["pooled_prompt_embeds"].to(pooled), pooled)
    return embeds, pooled


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_foundation(path, dtype: torch.dtype | str = torch.float32, with_t5: bool | None = None, *,
                    device: torch.device | str | None = None) -> StableDiffusion3Pipeline:
    """The frozen foundation as an SD3 pipeline, in ``dtype`` on ``device``: models in eval mode without
    grad, safetensors only, no remote code. Every stage loads it here, so a runtime policy (GPU, bf16) is
    one argument.

    ``with_t5``: None = load T5 (text_encoder_3 / tokenizer_3) when the folder ships one (the pretrained SD3
    profile: encode, evaluation and gates then embed prompts as the stock pipeline does); False = never
    (training, which reads cached embeddings). The tiny world ships none."""
    index = json.loads((Path(path) / "model_index.json").read_text())
    has_t5 = bool((index.get("text_encoder_3") or [None])[0])
    kw = {} if (has_t5 and with_t5 is not False) else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=_dtype(dtype), use_safetensors=True, **kw)
    blocks = pipe.transformer.transformer_blocks
    if not blocks[-1].context_pre_only or any(b.context_pre_only for b in blocks[:-1]):
        # pipeline.models.mapping skips exactly SD3's last block; another layout would be mis-injected.
        raise ValueError(f"{path}: only the last transformer block may be context_pre_only (SD3's layout)")
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe if device is None else pipe.to(device)


def load_controlnet(path, dtype: torch.dtype | str = torch.float32, *,
                    device: torch.device | str | None = None, condition: str = "inpaint") -> SD3ControlNetModel:
    """A frozen ControlNet (teacher or student) from its folder, in ``dtype`` on ``device``.

    ``extra_conditioning_channels`` is passed explicitly from ``condition`` (pipeline.models.condition): 1
    (the inpainting control input's mask channel), as diffusers' documentation loads the alimama teacher,
    or 0 (edges), whatever the folder's config.json says or omits. That the weights agree is checked before (pretrained.check_teacher reads
    pos_embed_input's 16 + 1 input channels from the safetensors header); a mismatch fails to load."""
    if not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"no ControlNet at {path} (config.json missing)")
    cn = SD3ControlNetModel.from_pretrained(path, dtype=_dtype(dtype), use_safetensors=True,
                                            extra_conditioning_channels=extra_conditioning_channels(condition))
    cn = cn.eval().requires_grad_(False)
    return cn if device is None else cn.to(device)
