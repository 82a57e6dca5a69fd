"""GPU smoke check (scripts/gpu_smoke.sh): no network, about 5 minutes on one CUDA GPU.

1. ``smoke``: the smoke profile's DVC pipeline in a fresh workspace, distillation in bf16, on the GPU
   (wall time per stage and the trainers' samples/s from metrics/distill/*.json).
2. ``bench``: a randomly initialised SD3-medium-shaped backbone (24 blocks, 24 heads x 64,
   joint_attention_dim 4096, pooled 2048, caption_projection 1536), the 23-layer teacher and a 12-layer
   student at 1024 px (128x128 latents, 4096 image tokens + 77 CLIP + 256 T5 text tokens), bf16:
   ControlNet-only and full-step (ControlNet + backbone) latency of teacher vs student, one
   distillation training step (teacher + backbone forward, student + backbone forward/backward with
   gradient checkpointing, AdamW), samples/s and peak memory.

``--dry-run`` (or no GPU): parameter counts and the memory plan from the real configs (meta tensors,
no allocation), then exit 0 with a clear message. ``--tiny``: the benchmark code at toy size on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json; alimama's ControlNet shares it.
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64, num_attention_heads=24,
                  joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                  out_channels=16, pos_embed_max_size=192)
# Text encoders and VAE of the same repo (for the memory plan only).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, vocab_size=49408, max_position_embeddings=77)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, vocab_size=49408, max_position_embeddings=77)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16)


@dataclass
class Shape:
    transformer: dict
    image_size: int
    vae_scale: int = 8
    blocks: int = 24
    teacher_layers: int = 23
    student_layers: int = 12
    text_tokens: int = 77 + 256
    extra: dict = field(default_factory=dict)

    @property
    def latent(self) -> int:
        return self.image_size // self.vae_scale


def realistic_shape(image_size: int = 1024) -> Shape:
    return Shape(dict(SD3_MEDIUM), image_size)


def tiny_shape() -> Shape:
    t = dict(SD3_MEDIUM, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
             caption_projection_dim=16, pooled_projection_dim=32, sample_size=8, pos_embed_max_size=8)
    return Shape(t, image_size=64, text_tokens=12)


# ------------------------------------------------------------------------------------------ build


def build(shape: Shape, device, dtype, seed: int = 0):
    """(backbone, teacher, student), randomly initialised directly on ``device``; frozen ones in ``dtype``,
    the student in float32 (master weights, as accelerate's mixed precision keeps them)."""
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel

    from pipeline.models.student import controlnet_from_backbone

    torch.manual_seed(seed)
    with torch.device(device):
        backbone = SD3Transformer2DModel(num_layers=shape.blocks, **shape.transformer)
        teacher = SD3ControlNetModel(num_layers=shape.teacher_layers, extra_conditioning_channels=1,
                                     force_zeros_for_pooled_projection=True, **shape.transformer)
        with torch.no_grad():  # zero projections would make the teacher a no-op
            for blk in teacher.controlnet_blocks:
                blk.weight.normal_(0, 0.02)
        student = controlnet_from_backbone(backbone, shape.student_layers)
    backbone = backbone.to(dtype).eval().requires_grad_(False)
    teacher = teacher.to(dtype).eval().requires_grad_(False)
    return backbone, teacher, student.float()


def inputs(shape: Shape, batch: int, device, dtype):
    t = shape.transformer
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g).to(device, dtype)

    lat = shape.latent
    return dict(noisy=r(batch, 16, lat, lat), timesteps=torch.full((batch,), 500.0, device=device),
                prompt_embeds=r(batch, shape.text_tokens, t["joint_attention_dim"]),
                pooled=r(batch, t["pooled_projection_dim"]), control=r(batch, 17, lat, lat))


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def benchmark(shape: Shape, device="cuda", dtype=torch.bfloat16, batch: int = 1, repeats: int = 5,
              train_batch: int | None = None) -> dict:
    from pipeline.distill.losses import af_loss
    from pipeline.models.controlled import Controlled
    from pipeline.models.mapping import af_pairs, skipped_blocks

    cuda = str(device).startswith("cuda")
    backbone, teacher, student = build(shape, device, dtype)
    t_ctrl = Controlled(backbone, teacher, "one_to_one")
    s_ctrl = Controlled(backbone, student, "interval")
    x = inputs(shape, batch, device, dtype)
    args = (x["noisy"], x["timesteps"], x["prompt_embeds"], x["pooled"])
    ac = torch.autocast(device_type="cuda" if cuda else "cpu", dtype=dtype, enabled=dtype != torch.float32)
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype).removeprefix("torch."),
           "image_size": shape.image_size, "latent": shape.latent, "batch": batch,
           "image_tokens": (shape.latent // shape.transformer["patch_size"]) ** 2, "text_tokens": shape.text_tokens,
           "params_m": {k: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
                        for k, m in (("backbone", backbone), ("teacher", teacher), ("student", student))}}

    with torch.no_grad(), ac:
        for name, c in (("teacher", t_ctrl), ("student", s_ctrl)):
            out[f"{name}_controlnet_ms"] = _time(lambda c=c: c.control(*args, x["control"]), device, repeats)
            out[f"{name}_step_ms"] = _time(lambda c=c: c(*args, x["control"]), device, repeats)
    out["backbone_only_step_ms"] = _time(lambda: torch.no_grad()(s_ctrl.denoise)(*args, None), device, repeats)
    out["controlnet_speedup"] = out["teacher_controlnet_ms"] / out["student_controlnet_ms"]
    out["step_speedup"] = out["teacher_step_ms"] / out["student_step_ms"]

    # One distillation step: teacher path without grad, student path with grad through the backbone.
    tb = train_batch or batch
    xt = inputs(shape, tb, device, dtype)
    targs = (xt["noisy"], xt["timesteps"], xt["prompt_embeds"], xt["pooled"])
    pairs = af_pairs(shape.blocks, shape.teacher_layers, shape.student_layers, "one_to_one", "interval",
                     skipped_blocks(backbone))
    student.train()
    student.enable_gradient_checkpointing()
    backbone.enable_gradient_checkpointing()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)

    def train_step():
        with ac:
            with torch.no_grad():
                t_res = t_ctrl.control(*targs, xt["control"])
                t_pred = t_ctrl.denoise(*targs, t_res)
            s_res = s_ctrl.control(*targs, xt["control"])
            s_pred = s_ctrl.denoise(*targs, s_res)
            loss = (s_pred.float() - t_pred.float()).pow(2).mean() + af_loss(s_res, t_res, pairs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out["train_step_ms"] = _time(train_step, device, max(1, repeats // 2))
    out["train_batch"] = tb
    out["train_samples_per_s"] = tb / (out["train_step_ms"] / 1000)
    if cuda:
        out["train_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# ------------------------------------------------------------------------------------ memory plan


def param_counts() -> dict[str, int]:
    """Parameters of every SD3-profile component, from the real configs, on the meta device."""
    from diffusers import AutoencoderKL, SD3ControlNetModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    n = {}
    with torch.device("meta"):
        n["backbone"] = SD3Transformer2DModel(num_layers=24, **SD3_MEDIUM)
        n["teacher"] = SD3ControlNetModel(num_layers=23, extra_conditioning_channels=1, **SD3_MEDIUM)
        n["student"] = SD3ControlNetModel(num_layers=12, extra_conditioning_channels=1, **SD3_MEDIUM)
        n["clip_l"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L))
        n["clip_g"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
        n["t5_xxl"] = T5EncoderModel(T5Config(**T5_XXL, is_encoder_decoder=False))
        n["vae"] = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                 **VAE)
    return {k: sum(p.numel() for p in m.parameters()) for k, m in n.items()}


def memory_plan(counts: dict[str, int], optimizer: str = "adamw") -> list[tuple[str, float, str]]:
    """(component, GB, note) resident on each GPU while distilling (bf16 frozen, fp32 student master)."""
    gb = 1e9
    s = counts["student"]
    state = 2 * s * (4 if optimizer == "adamw" else 1)  # AdamW m, v: fp32, or 8-bit (bitsandbytes)
    return [
        ("backbone (frozen, bf16)", 2 * counts["backbone"] / gb, "SD3-medium MMDiT"),
        ("teacher (frozen, bf16)", 2 * counts["teacher"] / gb, "alimama, 23 layers"),
        ("student weights (fp32 master)", 4 * s / gb, "12 layers, trainable"),
        ("student gradients (fp32)", 4 * s / gb, ""),
        (f"optimizer state ({optimizer})", state / gb, "m and v"),
        ("text encoders (T5-XXL, CLIP-L, CLIP-G)", 0.0,
         f"not resident: embeddings cached by the encode stage ({2 * (counts['t5_xxl'] + counts['clip_l'] + counts['clip_g']) / gb:.1f} GB in bf16 there)"),
        ("VAE", 0.0, f"not resident: latents cached by the encode stage ({2 * counts['vae'] / gb:.2f} GB there)"),
    ]


def print_plan() -> dict:
    counts = param_counts()
    print("parameters (from the real configs, meta tensors):")
    for k, v in counts.items():
        print(f"  {k:10s} {v / 1e6:9.1f} M params")
    for opt in ("adamw", "adamw8bit"):
        rows = memory_plan(counts, opt)
        total = sum(r[1] for r in rows)
        print(f"static memory per GPU, optimizer {opt}: {total:.1f} GB (+ activations)")
        for name, g, note in rows:
            print(f"  {name:40s} {g:6.1f} GB  {note}")
    return counts


# ------------------------------------------------------------------------------------------ smoke


def smoke_run(timeout_s: int, keep: Path | None = None) -> dict:
    """The smoke profile's DAG on the GPU (distillation in bf16) in a fresh workspace; per-stage seconds."""
    import yaml

    from pipeline.profile import make_workspace

    ws = Path(keep or tempfile.mkdtemp(prefix="gpu-smoke-")) / "ws"
    make_workspace("smoke", ws)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params.setdefault("distill", {})["mixed_precision"] = "bf16"
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "DVC_IGNORE_ISATTY": "1", "TQDM_DISABLE": "1", "GX_ANALYTICS_ENABLED": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ws)}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    wall = time.perf_counter() - t0
    res = {"workspace": str(ws), "returncode": proc.returncode, "wall_s": round(wall, 1)}
    if proc.returncode:
        res["log_tail"] = (proc.stdout + proc.stderr)[-3000:]
        return res
    for name in ("stage1", "stage2"):
        f = ws / "metrics" / "distill" / f"{name}.json"
        if f.exists():
            m = json.loads(f.read_text())
            res.update({k: v for k, v in m.items() if k.endswith(("samples_per_s", "train_seconds"))})
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="no GPU work: parameter counts and memory plan")
    ap.add_argument("--tiny", action="store_true", help="benchmark at toy size on CPU (checks the code path)")
    ap.add_argument("--skip-smoke", action="store_true", help="only the realistic-size benchmark")
    ap.add_argument("--skip-bench", action="store_true", help="only the smoke pipeline")
    ap.add_argument("--image-size", type=int, default=1024, choices=[512, 1024])
    ap.add_argument("--batch", type=int, default=1, help="inference batch for the latency figures")
    ap.add_argument("--train-batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke-timeout", type=int, default=240)
    ap.add_argument("--require-gpu", action="store_true", help="exit 2 (not 0) when there is no GPU")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    results: dict = {}
    if args.tiny:
        results["bench_tiny"] = benchmark(tiny_shape(), device="cpu", dtype=torch.float32, batch=1, repeats=1)
        print(json.dumps(results, indent=2))
        return 0
    has_gpu = torch.cuda.is_available()
    if args.dry_run or not has_gpu:
        if not has_gpu and not args.dry_run:
            print("gpu_smoke: no CUDA device visible (torch.cuda.is_available() is False, torch "
                  f"{torch.__version__}); nothing was run on a GPU. Showing the dry run instead.")
        print("gpu_smoke dry run: the realistic shapes are SD3-medium's (24 blocks, 24 heads x 64, "
              "joint_attention_dim 4096, pooled 2048); teacher 23 layers, student 12, "
              f"{args.image_size} px -> {args.image_size // 8}x{args.image_size // 8} latents")
        print_plan()
        return 2 if (args.require_gpu and not has_gpu) else 0

    print(f"gpu_smoke on {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
    if not args.skip_bench:
        torch.backends.cuda.matmul.allow_tf32 = True
        results["bench"] = benchmark(realistic_shape(args.image_size), "cuda", torch.bfloat16, args.batch,
                                     args.repeats, args.train_batch)
        print(json.dumps({"bench": results["bench"]}, indent=2), flush=True)
        torch.cuda.empty_cache()
    if not args.skip_smoke:
        results["smoke"] = smoke_run(args.smoke_timeout)
        print(json.dumps({"smoke": results["smoke"]}, indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    ok = results.get("smoke", {}).get("returncode", 0) == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
