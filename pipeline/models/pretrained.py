"""The pretrained world: SD3-medium (backbone, VAE, CLIP-L, CLIP-G, T5), the alimama inpainting teacher and
the Qwen2.5-VL captioner, resolved from a local folder or the Hugging Face hub cache and checked before
anything runs.

Params section ``world`` (validated by ``WorldConfig``; ``source: embedded`` = the tiny world trained by
the foundation stages, the default). With ``source: pretrained`` the stages ``foundation_vae``,
``foundation`` and ``teacher`` call ``materialise`` instead of training: it resolves the model, checks its
configs (and the shapes of a few weights, read from the safetensors headers, without loading them), then
links (or copies) the files into models/vae, models/foundation, models/teacher in the standard
diffusers layouts, and writes ``SOURCE.json`` (repo, requested and resolved revision, path) beside them.

Resolution order for each model: ``local_dir`` (a folder in the diffusers / transformers layout), then
the hub cache (``huggingface_hub.snapshot_download(local_files_only=True)``; ``world.cache_dir`` or
HF_HUB_CACHE / HF_HOME), then -- only with ``world.allow_download: true`` -- a download. Nothing here
passes ``trust_remote_code``.

    python -m pipeline.models.pretrained check [--params params.yaml] [--load]
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.config import SHA, Config, ConfigError, ModelRef, WorldConfig

# Files a diffusers / transformers model folder needs (the hub repos also hold images and single-file
# checkpoints that we never read).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
PIPELINE_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                       "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")


class ModelError(ConfigError):
    """A pretrained model that is missing or does not match what the params expect."""


def world_config(cfg: Config) -> WorldConfig:
    return cfg.world


def is_pretrained(cfg: Config) -> bool:
    return world_config(cfg).source == "pretrained"


# --------------------------------------------------------------------------------------------- resolve


@dataclass(frozen=True)
class Resolved:
    name: str               # foundation | teacher | captioner
    ref: ModelRef
    path: Path
    how: str                # local_dir | hub_cache | download
    commit: str | None      # the snapshot's commit when resolved from the hub cache

    def describe(self) -> str:
        rev = f"@{self.ref.revision}" if self.ref.revision else ""
        return f"{self.name} ({self.ref.repo}{rev}) at {self.path}"

    def source(self) -> dict:
        return {"name": self.name, "repo": self.ref.repo, "revision": self.ref.revision,
                "resolved_commit": self.commit, "path": str(self.path), "resolved_from": self.how}


def _hub_cache(cache_dir: str | None) -> str | None:
    return os.path.expanduser(cache_dir) if cache_dir else None


def resolve(name: str, ref: ModelRef, cache_dir: str | None = None, allow_download: bool = False) -> Resolved:
    """The folder holding ``ref``: local_dir, else the hub cache, else (if allowed) a download."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    tried = []
    if ref.local_dir:
        p = Path(ref.local_dir).expanduser()
        if p.is_dir() and any(p.iterdir()):
            return Resolved(name, ref, p.resolve(), "local_dir", None)
        tried.append(f"local_dir {p} (missing or empty)")
    # A plain path given as the repo (e.g. caption.qwen.model: /models/qwen) is a local folder.
    if Path(ref.repo).expanduser().is_dir():
        return Resolved(name, ref, Path(ref.repo).expanduser().resolve(), "local_dir", None)
    cache = _hub_cache(cache_dir)
    kw = dict(repo_id=ref.repo, revision=ref.revision, cache_dir=cache, allow_patterns=ALLOW_PATTERNS)
    try:
        p = Path(snapshot_download(local_files_only=True, **kw))
        return Resolved(name, ref, p, "hub_cache", p.name if SHA.match(p.name) else None)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as exc:
        from huggingface_hub import constants

        tried.append(f"hub cache {cache or constants.HF_HUB_CACHE} ({type(exc).__name__})")
    if allow_download:
        p = Path(snapshot_download(**kw))
        return Resolved(name, ref, p, "download", p.name if SHA.match(p.name) else None)
    rev = f" --revision {ref.revision}" if ref.revision else ""
    raise ModelError(
        f"{name}: model {ref.repo!r}{'@' + ref.revision if ref.revision else ''} not found; tried "
        + "; ".join(tried)
        + f". Fetch it on a machine with network (`huggingface-cli download {ref.repo}{rev}`) into the hub "
        f"cache or a folder named by world.{name}.local_dir, or set world.allow_download: true."
    )


# ----------------------------------------------------------------------------------------------- check


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
    c.eq("in_channels", 16, "SD3 latents")
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
    """Check the inpainting ControlNet folder against the params and the backbone's config."""
    t = _json(r, "config.json")
    c = _Checker(r, "config.json", t)
    c.eq("_class_name", "SD3ControlNetModel")
    c.eq("num_layers", cfg.teacher.num_layers, "teacher.num_layers")
    c.eq("extra_conditioning_channels", 1, "the inpainting mask channel: 16 latent + 1 mask")
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
    _expect_shape(r, "", shapes, "pos_embed_input.proj.weight", [inner, t["in_channels"] + 1, p, p],
                  "control input: 16 latent channels + 1 mask channel")
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


# ------------------------------------------------------------------------------------------- preflight


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
    w = world_config(cfg)
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


# ----------------------------------------------------------------------------------------- materialise


def _link_tree(src: Path, dst: Path, how: str, info: dict) -> None:
    """Mirror ``src`` into a fresh ``dst`` (a real folder, written atomically with ``info`` as SOURCE.json):
    per-file symlinks to the resolved blobs, hard links, or copies. Only the files a model folder needs
    (ALLOW_PATTERNS) are mirrored."""
    import fnmatch

    from pipeline.atomic import write_dir

    with write_dir(dst) as tmp:
        files = [f for f in sorted(src.rglob("*"))
                 if not f.is_dir() and any(fnmatch.fnmatch(f.name, p) for p in ALLOW_PATTERNS)]
        if not files:
            raise ModelError(f"{src}: no model files to materialise")
        for f in files:
            out = tmp / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            real = f.resolve()
            if how == "symlink":
                out.symlink_to(real)
            elif how == "hardlink":
                try:
                    os.link(real, out)
                except OSError:
                    shutil.copy2(real, out)
            else:
                shutil.copy2(real, out)
        (tmp / "SOURCE.json").write_text(json.dumps(info, indent=2))


def materialise(cfg: Config, what: Literal["vae", "backbone", "teacher"], out: Path) -> dict:
    """Resolve + check the pretrained models, then write ``out`` (models/vae, models/backbone or
    models/teacher) and ``out/SOURCE.json``. Returns a small metrics dict for the stage."""
    w = world_config(cfg)
    world = preflight(cfg, captioner=(what == "vae"))  # the first foundation stage checks the captioner too
    r = world.teacher if what == "teacher" else world.foundation
    src = r.path / "vae" if what == "vae" else r.path
    _link_tree(src, Path(out), w.link, {**r.source(), "component": what, "link": w.link})
    metrics = {"source": "pretrained", "repo": r.ref.repo, "revision": r.ref.revision,
               "resolved_commit": r.commit, "resolved_from": r.how}
    if what == "vae":
        vae = _json(r, "vae/config.json")
        metrics.update(shift_factor=vae["shift_factor"], scaling_factor=vae["scaling_factor"])
        if world.captioner is not None:
            metrics["captioner"] = world.captioner.source()
    elif what == "backbone":
        metrics.update(num_layers=world.transformer_config["num_layers"],
                       joint_attention_dim=world.transformer_config["joint_attention_dim"])
    else:
        metrics.update(num_layers=world.teacher_config["num_layers"])
    return metrics


# ---------------------------------------------------------------------------------------------- load


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def load_foundation_pipeline(path: Path, dtype: str = "float32", with_t5: bool = True):
    """The SD3 pipeline from a checked folder (safetensors only, no remote code), models frozen."""
    from diffusers import StableDiffusion3Pipeline

    kw = {} if with_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(path, torch_dtype=torch_dtype(dtype), use_safetensors=True, **kw)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        m = getattr(pipe, name, None)
        if m is not None:
            m.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_teacher(path: Path, dtype: str = "float32"):
    from diffusers import SD3ControlNetModel

    return (SD3ControlNetModel.from_pretrained(path, torch_dtype=torch_dtype(dtype), use_safetensors=True)
            .eval().requires_grad_(False))


def load_world(cfg: Config, dtype: str | None = None, with_t5: bool = True):
    """preflight + load: (SD3 pipeline, teacher). Checks the loaded backbone's structure as well."""
    w = world_config(cfg)
    world = preflight(cfg, captioner=False)
    dt = dtype or w.dtype
    pipe = load_foundation_pipeline(world.foundation.path, dt, with_t5)
    teacher = load_teacher(world.teacher.path, dt)
    blocks = pipe.transformer.transformer_blocks
    if not blocks[-1].context_pre_only or any(b.context_pre_only for b in blocks[:-1]):
        raise ModelError(f"{world.foundation.describe()}: only the last transformer block may be context_pre_only")
    return pipe, teacher


def main(argv=None) -> None:
    import argparse

    from pipeline.config import load

    ap = argparse.ArgumentParser(description="check the pretrained models the params name (no downloads)")
    ap.add_argument("action", choices=["check"])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--load", action="store_true", help="also load the weights (slow for the real models)")
    args = ap.parse_args(argv)
    cfg = load(args.params)
    try:
        world = preflight(cfg)
        for r in (world.foundation, world.teacher, world.captioner):
            if r is not None:
                print(f"ok  {r.describe()} [{r.how}{', commit ' + r.commit if r.commit else ''}]")
        if args.load:
            load_world(cfg)
            print("ok  loaded foundation pipeline and teacher")
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
