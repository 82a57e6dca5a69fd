"""Tiny, randomly initialised stand-ins for the real SD3 profile's models, saved offline in exactly the
real folder layouts:

- ``build_tiny_sd3_pipeline``: stabilityai/stable-diffusion-3-medium-diffusers' layout (model_index.json,
  transformer, vae, text_encoder, text_encoder_2, text_encoder_3 = T5EncoderModel, tokenizer, tokenizer_2,
  tokenizer_3 = T5 tokenizer, scheduler), 24 joint blocks.
- ``build_tiny_teacher``: alimama-creative/SD3-Controlnet-Inpainting's layout (config.json +
  diffusion_pytorch_model.safetensors), 23 layers, extra_conditioning_channels 1, control projections
  given random weights.
- ``hub_cache_layout``: a folder moved into the hub cache's layout (models--org--name/snapshots/SHA, refs/main).
The Qwen2.5-VL folder comes from tests/qwen_tiny.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

HEADS, HEAD_DIM = 2, 8
CLIP_HIDDEN, CLIP_PROJ = 16, 16
T5_DIM = 32            # = joint_attention_dim, as T5-XXL's 4096 is SD3-medium's
IMAGE_SIZE = 32        # 2x VAE downsampling -> 16x16 latents
VAE_CHANNELS = (16, 16)
CORPUS = ["a red circle on a striped background", "a blue square", "two green rings", "a yellow cross"] * 10


def transformer_kwargs() -> dict:
    lat = IMAGE_SIZE // 2
    return dict(sample_size=lat, patch_size=2, in_channels=16, attention_head_dim=HEAD_DIM,
                num_attention_heads=HEADS, joint_attention_dim=T5_DIM, caption_projection_dim=HEADS * HEAD_DIM,
                pooled_projection_dim=2 * CLIP_PROJ, out_channels=16, pos_embed_max_size=lat // 2)


def clip_tokenizer():
    from types import SimpleNamespace

    from pipeline.models.world import train_tokenizer

    cfg = SimpleNamespace(text=SimpleNamespace(vocab_size=320, tokenizer_max_length=77))
    return train_tokenizer(CORPUS, cfg)


def t5_tokenizer():
    """A T5 tokenizer (Unigram, </s> appended) trained offline; saved as tokenizer.json like T5TokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"],
                                                            unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def build_tiny_sd3_pipeline(path: str | Path, num_layers: int = 24, seed: int = 0) -> Path:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok, tok3 = clip_tokenizer(), t5_tokenizer()

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=CLIP_HIDDEN, intermediate_size=4 * CLIP_HIDDEN, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=CLIP_PROJ, hidden_act="gelu",
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))

    t5 = T5EncoderModel(T5Config(vocab_size=len(tok3), d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    n = len(VAE_CHANNELS)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=VAE_CHANNELS, layers_per_block=1,
                        latent_channels=16, norm_num_groups=16, sample_size=IMAGE_SIZE, mid_block_add_attention=False,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(num_layers=num_layers, **transformer_kwargs()),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip(), tokenizer=tok, text_encoder_2=clip(), tokenizer_2=tok,
        text_encoder_3=t5, tokenizer_3=tok3)
    pipe.save_pretrained(path)
    # The hub folder names the fast class (transformers 5 calls it T5Tokenizer; both load the same files).
    index = Path(path) / "model_index.json"
    data = json.loads(index.read_text())
    data["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
    index.write_text(json.dumps(data, indent=2))
    return Path(path)


def build_tiny_teacher(path: str | Path, num_layers: int = 23, seed: int = 1, **overrides) -> Path:
    """A 23-layer SD3ControlNetModel whose control projections and pos_embed_input carry random weights
    (all-zero projections would output zero residuals)."""
    import torch
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed)
    cn = SD3ControlNetModel(num_layers=num_layers, extra_conditioning_channels=1,
                            **{**transformer_kwargs(), **overrides})
    with torch.no_grad():
        for blk in cn.controlnet_blocks:
            blk.weight.normal_(0, 0.05)
        for p in cn.pos_embed_input.parameters():
            p.normal_(0, 0.05)
    cn.save_pretrained(path)
    return Path(path)


def hub_cache_layout(folder: Path, cache_dir: Path, repo: str, commit: str = "0" * 39 + "1") -> Path:
    """Move ``folder`` into ``cache_dir`` as the hub cache stores ``repo`` at ``commit`` (refs/main too)."""
    root = Path(cache_dir) / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(folder, snap)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snap


def tiny_overrides(foundation: Path, teacher: Path, qwen: Path | None = None) -> dict:
    """What the sd3 profile needs overridden to describe these tiny models (everything else stays)."""
    out = {
        "data": {"image_size": IMAGE_SIZE},
        "vae": {"block_out_channels": list(VAE_CHANNELS), "layers_per_block": 1},
        "backbone": {"num_attention_heads": HEADS, "attention_head_dim": HEAD_DIM},
        "world": {"foundation": {"local_dir": str(foundation)}, "teacher": {"local_dir": str(teacher)}},
    }
    if qwen is not None:
        out["caption"] = {"qwen": {"model": str(qwen), "device": "cpu", "dtype": "float32"}}
    return out
