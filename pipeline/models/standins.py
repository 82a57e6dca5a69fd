"""Small, randomly initialised stand-ins for the SD3 profile's pretrained models, built offline with the real
classes and saved in the real hub layouts, so that the pretrained code path (resolve, check, materialise,
load, encode with T5, caption with Qwen2.5-VL, distil, evaluate) runs end to end on CPU in CI:

- ``sd3-medium/``: stabilityai/stable-diffusion-3-medium-diffusers' layout (model_index.json, transformer,
  vae, text_encoder, text_encoder_2, text_encoder_3 = T5EncoderModel, tokenizer, tokenizer_2, tokenizer_3,
  scheduler). SD3Transformer2DModel with 24 joint blocks (the last ``context_pre_only``, as SD3-medium's);
  AutoencoderKL with 16 latent channels, 8x downsampling and SD3's shift/scaling factors; two
  CLIPTextModelWithProjection and a T5 encoder whose width is the transformer's ``joint_attention_dim``.
- ``sd3-controlnet-inpainting/``: alimama-creative/SD3-Controlnet-Inpainting's layout (config.json +
  diffusion_pytorch_model.safetensors): SD3ControlNetModel, 23 layers, extra_conditioning_channels 1, its
  control projections and ``pos_embed_input`` given random non-zero weights (all-zero projections would
  output zero residuals).
- ``qwen2.5-vl/``: Qwen/Qwen2.5-VL-*-Instruct's layout: Qwen2_5_VLForConditionalGeneration, a byte-level BPE
  tokenizer with Qwen's special tokens and a chat template, and Qwen2VLImageProcessor's config (loaded with
  the PIL backend, no torchvision). Greedy decoding of a random model would write bytes at random: the
  output rows of special tokens and of tokens that are not whole printable text are zeroed, so it writes
  printable words instead -- quotes, ``?``, ``!`` and non-ASCII letters among them, like a real VLM -- and
  never stops early (no empty caption); its weights are drawn at 10x Qwen's init scale, so that what it
  writes depends on the image and the instruction (local and global captions differ).

Sizes: configs/sd3_local.yaml describes these models (data.image_size, vae.block_out_channels,
backbone.*); tests/test_sd3_profile.py checks that the two agree.

    python -m pipeline.models.standins DIR    # writes DIR/sd3-medium, DIR/sd3-controlnet-inpainting, DIR/qwen2.5-vl
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import unicodedata
from pathlib import Path

FOUNDATION_DIR, TEACHER_DIR, QWEN_DIR = "sd3-medium", "sd3-controlnet-inpainting", "qwen2.5-vl"

HEADS, HEAD_DIM = 2, 8                 # SD3-medium: 24 x 64
CLIP_HIDDEN, CLIP_PROJ = 16, 16        # CLIP-L 768 / CLIP-G 1280 hidden, projections add up to pooled
T5_DIM = 32                            # = joint_attention_dim, as T5-XXL's 4096 is SD3-medium's
IMAGE_SIZE = 64                        # 8x VAE downsampling -> 8x8 latents, 16 image tokens at patch 2
VAE_CHANNELS = (16, 16, 16, 16)        # four levels, as SD3's (128, 256, 512, 512)
SHIFT_FACTOR, SCALING_FACTOR = 0.0609, 1.5305   # SD3-medium's vae/config.json
POS_EMBED_MAX_SIZE = 16                # patches a side: up to 256 px
CORPUS = ["a red circle on a striped background", "a blue square", "two green rings", "a yellow cross",
          "a purple diamond on a checkered background", "an orange triangle", "a white ring on a dotted background"]
# What a VLM writes besides plain ASCII words: the Qwen stand-in's vocabulary holds these, so its captions do.
VLM_CORPUS = [*CORPUS, "the café's \"blue\" sign?", "Müller's crème brûlée!", "naïve façade, jalapeño - señor",
              "what is it? a square!", "Zürich's Ölmühle: 'grün'"]


def transformer_kwargs(image_size: int = IMAGE_SIZE) -> dict:
    """SD3Transformer2DModel / SD3ControlNetModel arguments shared by backbone and teacher."""
    lat = image_size // 2 ** (len(VAE_CHANNELS) - 1)
    return dict(sample_size=lat, patch_size=2, in_channels=16, attention_head_dim=HEAD_DIM,
                num_attention_heads=HEADS, joint_attention_dim=T5_DIM, caption_projection_dim=HEADS * HEAD_DIM,
                pooled_projection_dim=2 * CLIP_PROJ, out_channels=16, pos_embed_max_size=POS_EMBED_MAX_SIZE)


# ----------------------------------------------------------------------------------------- SD3 pipeline


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
    tok.train_from_iterator(CORPUS * 5, trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def build_sd3_pipeline(path: str | Path, num_layers: int = 24, image_size: int = IMAGE_SIZE, seed: int = 0) -> Path:
    """The SD3-medium stand-in, saved with StableDiffusion3Pipeline.save_pretrained."""
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
                        latent_channels=16, norm_num_groups=8, sample_size=image_size, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=SHIFT_FACTOR, scaling_factor=SCALING_FACTOR)
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(num_layers=num_layers, **transformer_kwargs(image_size)),
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


def build_teacher(path: str | Path, num_layers: int = 23, image_size: int = IMAGE_SIZE, seed: int = 1,
                  **overrides) -> Path:
    """The alimama teacher's stand-in: ``num_layers`` layers, extra_conditioning_channels 1, control
    projections and pos_embed_input with random weights."""
    import torch
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed)
    cn = SD3ControlNetModel(num_layers=num_layers, extra_conditioning_channels=1,
                            **{**transformer_kwargs(image_size), **overrides})
    with torch.no_grad():
        for blk in cn.controlnet_blocks:
            blk.weight.normal_(0, 0.05)
        for p in cn.pos_embed_input.parameters():
            p.normal_(0, 0.05)
    cn.save_pretrained(path)
    return Path(path)


# ------------------------------------------------------------------------------------------ Qwen2.5-VL

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _writes_text(piece: str) -> bool:
    """A token whose text is whole printable characters (no control character, no half of a UTF-8 byte
    sequence, not only whitespace)."""
    return bool(piece.strip()) and "\ufffd" not in piece and not any(
        unicodedata.category(ch).startswith("C") for ch in piece)


def build_qwen(path: str | Path, seed: int = 0) -> Path:
    """The Qwen2.5-VL stand-in: model, tokenizer (with the chat template) and image processor config."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [*VLM_CORPUS, "describe the region in a short phrase", "user assistant image crop overlay"] * 10
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN_SPECIAL, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        extra_special_tokens={"image_token": "<|image_pad|>",
                                                              "video_token": "<|video_pad|>"})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=False,
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    silent = [i for i in range(len(tokenizer))
              if i in tokenizer.all_special_ids or not _writes_text(tokenizer.decode([i]))]
    with torch.no_grad():
        # Weights 10x Qwen's init scale: at 0.02 a random one-layer model's residual stream drowns what
        # attention reads, and greedy decoding writes one caption whatever the image and the instruction.
        for name, w in model.named_parameters():
            if w.ndim >= 2 and not name.startswith("lm_head"):
                w.normal_(0, 0.2)
        model.lm_head.weight.normal_(0, 1.0)
        model.lm_head.weight[silent] = 0.0   # logit 0, below the best printable token's: greedy never picks them
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    # Name the classes as the hub repos do (the PIL backend is chosen at load time, not in the files).
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        f = path / name
        data = json.loads(f.read_text())
        data["processor_class"] = "Qwen2_5_VLProcessor"
        if name == "preprocessor_config.json":
            data["image_processor_type"] = "Qwen2VLImageProcessor"
        f.write_text(json.dumps(data, indent=2))
    return path


# ------------------------------------------------------------------------------------------------ all


def hub_cache_layout(folder: Path, cache_dir: Path, repo: str, commit: str = "0" * 39 + "1") -> Path:
    """Copy ``folder`` into ``cache_dir`` as the hub cache stores ``repo`` at ``commit`` (refs/main too)."""
    root = Path(cache_dir) / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(folder, snap)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snap


def write_standins(dest: str | Path, image_size: int = IMAGE_SIZE) -> dict[str, Path]:
    """Write the three stand-ins under ``dest`` (each folder atomically; one already there is rebuilt)."""
    from pipeline.atomic import write_dir

    dest = Path(dest)
    out = {}
    for name, folder, build in (("foundation", FOUNDATION_DIR, lambda p: build_sd3_pipeline(p, image_size=image_size)),
                                ("teacher", TEACHER_DIR, lambda p: build_teacher(p, image_size=image_size)),
                                ("captioner", QWEN_DIR, build_qwen)):
        with write_dir(dest / folder) as tmp:
            build(tmp)
        out[name] = dest / folder
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dest", help="folder to write the stand-ins into (configs/sd3_local.yaml reads `standins/`)")
    ap.add_argument("--image-size", type=int, default=IMAGE_SIZE)
    args = ap.parse_args(argv)
    for name, path in write_standins(args.dest, args.image_size).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
