"""Check resolved pretrained models against the params before anything loads them: their configs, and the
shapes of a few weights read from the safetensors headers (nothing is loaded). ``preflight`` resolves and
checks every model the params name; ``load_world`` then loads them."""

from __future__ import annotations

import json
from dataclasses import dataclass

from pipeline.config import Config, ConfigError, ModelRef
from pipeline.models.pretrained.resolve import ModelError, Resolved, resolve


PIPELINE_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                       "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")


def _json(r: Resolved, rel: str) -> dict:
    f = r.path / rel
    if not f.is_file():
        raise ModelError(f"{r.describe()}: {rel} is missing (not a {r.name} folder in the diffusers layout?)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{r.describe()}: {rel} is not valid JSON: {exc}") from None


class _Checker:
    """Collects mismatches for one model; raises one error naming model, file and every bad key."""

    def __init__(self, r: Resolved, rel: str, conf: dict):
        self.r, self.rel, self.conf, self.bad = r, rel, conf, []

    def eq(self, key: str, expected, why: str = ""):
        got = self.conf.get(key)
        if got != expected:
            self.bad.append(f"{key} is {got!r}, expected {expected!r}" + (f" ({why})" if why else ""))

    def present(self, key: str):
        if self.conf.get(key) is None:
            self.bad.append(f"{key} is missing")

    def fail(self, msg: str):
        self.bad.append(msg)

    def done(self):
        if self.bad:
            raise ModelError(f"{self.r.describe()}: {self.rel}: " + "; ".join(self.bad))


def _weights_header(r: Resolved, sub: str) -> dict[str, list[int]]:
    """{tensor name: shape} of a model folder's safetensors (single file or sharded), headers only."""
    from safetensors import safe_open

    folder = r.path / sub if sub else r.path
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{r.describe()}: no *.safetensors weights in {folder} (only safetensors are loaded)")
    shapes = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                shapes[k] = list(fh.get_slice(k).get_shape())
    return shapes


def _expect_shape(r: Resolved, sub: str, shapes: dict, key: str, expected: list[int], why: str):
    got = shapes.get(key)
    if got != expected:
        raise ModelError(f"{r.describe()}: {sub or '.'}/*.safetensors: {key} has shape {got}, expected "
                         f"{expected} ({why})")


SHARED_KEYS = ("in_channels", "out_channels", "patch_size", "attention_head_dim", "num_attention_heads",
               "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "pos_embed_max_size")


def check_foundation(r: Resolved, cfg: Config, require_t5: bool = True) -> dict:
    """Check an SD3 pipeline folder against the params; returns the transformer config."""
    index = _json(r, "model_index.json")
    missing = [c for c in PIPELINE_COMPONENTS if not (isinstance(index.get(c), list) and index[c][0])]
    if not require_t5:
        missing = [c for c in missing if c not in ("text_encoder_3", "tokenizer_3")]
    if missing:
        raise ModelError(f"{r.describe()}: model_index.json: components {missing} are missing"
                         + (" (the sd3 profile needs T5: world.require_t5)" if "text_encoder_3" in missing else ""))
    if index.get("_class_name") not in ("StableDiffusion3Pipeline", "StableDiffusion3ControlNetInpaintingPipeline"):
        raise ModelError(f"{r.describe()}: model_index.json: _class_name is {index.get('_class_name')!r}, "
                         "expected 'StableDiffusion3Pipeline'")
    tf = _json(r, "transformer/config.json")
    c = _Checker(r, "transformer/config.json", tf)
    c.eq("_class_name", "SD3Transformer2DModel")
    c.eq("num_layers", cfg.backbone.num_layers, "backbone.num_layers")
    c.eq("num_attention_heads", cfg.backbone.num_attention_heads, "backbone.num_attention_heads")
    c.eq("attention_head_dim", cfg.backbone.attention_head_dim, "backbone.attention_head_dim")
    c.eq("patch_size", cfg.backbone.patch_size, "backbone.patch_size")
    if tf.get("dual_attention_layers"):
        c.fail(f"dual_attention_layers is {tf['dual_attention_layers']} (an SD3.5 backbone; the alimama "
               "teacher was trained on SD3-medium)")
    c.done()

    vae = _json(r, "vae/config.json")
    c = _Checker(r, "vae/config.json", vae)
    c.eq("_class_name", "AutoencoderKL")
    c.eq("latent_channels", tf["in_channels"], "transformer in_channels")
    c.present("shift_factor")
    c.present("scaling_factor")
    scale = 2 ** (len(vae.get("block_out_channels", [])) - 1)
    c.eq("block_out_channels", list(cfg.vae.block_out_channels), "vae.block_out_channels")
    lat = cfg.data.image_size // scale
    if cfg.data.image_size % (scale * tf["patch_size"]):
        c.fail(f"data.image_size {cfg.data.image_size} is not divisible by {scale * tf['patch_size']}")
    elif lat // tf["patch_size"] > tf.get("pos_embed_max_size", 10**9):
        c.fail(f"data.image_size {cfg.data.image_size} gives {lat // tf['patch_size']} patches a side, more than "
               f"the transformer's pos_embed_max_size {tf['pos_embed_max_size']}")
    c.done()

    te1, te2 = _json(r, "text_encoder/config.json"), _json(r, "text_encoder_2/config.json")
    pooled = (te1.get("projection_dim") or 0) + (te2.get("projection_dim") or 0)
    c = _Checker(r, "transformer/config.json", tf)
    c.eq("pooled_projection_dim", pooled, "text_encoder + text_encoder_2 projection_dim")
    if (te1.get("hidden_size") or 0) + (te2.get("hidden_size") or 0) > tf["joint_attention_dim"]:
        c.fail(f"joint_attention_dim {tf['joint_attention_dim']} is narrower than the two CLIPs' hidden sizes")
    c.done()
    if index.get("text_encoder_3") and index["text_encoder_3"][0]:
        t5 = _json(r, "text_encoder_3/config.json")
        c = _Checker(r, "text_encoder_3/config.json", t5)
        c.eq("d_model", tf["joint_attention_dim"], "transformer joint_attention_dim")
        c.done()
        tok3 = r.path / "tokenizer_3"
        if not any((tok3 / f).is_file() for f in ("tokenizer.json", "spiece.model")):
            raise ModelError(f"{r.describe()}: tokenizer_3/: neither tokenizer.json nor spiece.model")
        tc = _json(r, "tokenizer_3/tokenizer_config.json")
        mx = tc.get("model_max_length")
        if isinstance(mx, int) and cfg.text.max_sequence_length > max(mx, 512):
            raise ModelError(f"{r.describe()}: text.max_sequence_length {cfg.text.max_sequence_length} exceeds "
                             f"tokenizer_3 model_max_length {mx}")

    # Weights: present, and block L-1 is context_pre_only (its context norm has 2, not 6, modulations).
    shapes = _weights_header(r, "transformer")
    inner = tf["num_attention_heads"] * tf["attention_head_dim"]
    last = tf["num_layers"] - 1
    _expect_shape(r, "transformer", shapes, f"transformer_blocks.{last}.norm1_context.linear.weight",
                  [2 * inner, inner], f"block {last} must be context_pre_only")
    _expect_shape(r, "transformer", shapes, f"transformer_blocks.{last - 1}.norm1_context.linear.weight",
                  [6 * inner, inner], f"block {last - 1} must take a context update")
    _weights_header(r, "vae")
    return tf


def check_teacher(r: Resolved, cfg: Config, backbone: dict) -> dict:
    """Check the teacher ControlNet folder against the params (its input channels: ``condition``,
    pipeline.models.condition.extra_conditioning_channels) and the backbone's config."""
    from pipeline.models.condition import extra_conditioning_channels

    extra = extra_conditioning_channels(cfg.condition)
    t = _json(r, "config.json")
    c = _Checker(r, "config.json", t)
    c.eq("_class_name", "SD3ControlNetModel")
    c.eq("num_layers", cfg.teacher.num_layers, "teacher.num_layers")
    # Loaded with extra_conditioning_channels passed explicitly from the condition (world.load_controlnet:
    # 1 under inpaint, as diffusers loads the alimama teacher; 0 under edges); a config that omits the key is
    # fine, the weight shapes below decide.
    if "extra_conditioning_channels" in t:
        c.eq("extra_conditioning_channels", extra,
             "the inpainting mask channel" if extra else "condition edges: no mask channel")
    for k in SHARED_KEYS:
        if k in t or k in backbone:
            c.eq(k, backbone.get(k), f"must match the backbone's transformer/config.json")
    if (t.get("num_layers") or 0) > backbone["num_layers"] - 1:
        c.fail(f"num_layers {t.get('num_layers')} exceeds the backbone's {backbone['num_layers'] - 1} "
               "blocks that take a residual")
    c.done()
    shapes = _weights_header(r, "")
    inner = t["num_attention_heads"] * t["attention_head_dim"]
    n, p = t["num_layers"], t["patch_size"]
    _expect_shape(r, "", shapes, f"controlnet_blocks.{n - 1}.weight", [inner, inner], f"{n} control projections")
    if f"controlnet_blocks.{n}.weight" in shapes:
        raise ModelError(f"{r.describe()}: weights hold more than num_layers={n} control projections")
    _expect_shape(r, "", shapes, "pos_embed_input.proj.weight", [inner, t["in_channels"] + extra, p, p],
                  f"control input: {t['in_channels']} latent channels + {extra} mask channel"
                  f" (condition {cfg.condition})")
    return t


def check_captioner(r: Resolved) -> dict:
    conf = _json(r, "config.json")
    c = _Checker(r, "config.json", conf)
    c.eq("model_type", "qwen2_5_vl")
    c.done()
    if not list(r.path.glob("*.safetensors")):
        raise ModelError(f"{r.describe()}: no *.safetensors weights")
    if not any((r.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelError(f"{r.describe()}: no tokenizer files")
    return conf


@dataclass
class World:
    foundation: Resolved
    teacher: Resolved
    captioner: Resolved | None
    transformer_config: dict
    teacher_config: dict


def captioner_ref(cfg: Config) -> ModelRef | None:
    cap = cfg.caption
    if cap.backend != "qwen2_5_vl":
        return None
    return ModelRef(repo=cap.qwen.model, revision=cap.qwen.revision, local_dir=None)


def preflight(cfg: Config, captioner: bool = True) -> World:
    """Resolve and check every pretrained model the params name; raise ModelError on the first problem."""
    w = cfg.world
    if w.source != "pretrained":
        raise ConfigError("world.source is 'embedded': there are no pretrained models to check")
    f = resolve("foundation", w.foundation, w.cache_dir, w.allow_download)
    tf = check_foundation(f, cfg, w.require_t5)
    t = resolve("teacher", w.teacher, w.cache_dir, w.allow_download)
    tc = check_teacher(t, cfg, tf)
    cap = None
    ref = captioner_ref(cfg) if captioner else None
    if ref is not None:
        cap = resolve("captioner", ref, w.cache_dir, w.allow_download)
        check_captioner(cap)
    return World(f, t, cap, tf, tc)


def load_world(cfg: Config, dtype: str | None = None, with_t5: bool | None = None):
    """``preflight``, then (SD3 pipeline, teacher) through the one loader of frozen models
    (pipeline.models.world), in ``dtype`` (default ``world.dtype``); ``with_t5`` as there."""
    from pipeline.models.world import load_controlnet, load_foundation

    world = preflight(cfg, captioner=False)
    dtype = dtype or cfg.world.dtype
    return (load_foundation(world.foundation.path, dtype, with_t5),
            load_controlnet(world.teacher.path, dtype, condition=cfg.condition))
