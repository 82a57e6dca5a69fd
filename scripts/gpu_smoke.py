"""GPU smoke check (run by scripts/gpu_smoke.sh): no network, about 5 minutes on one CUDA GPU.

1. ``smoke``: the smoke profile's DVC pipeline in a fresh workspace, distillation in bf16, on the GPU
   (wall time per stage and the trainers' samples/s from metrics/distill/*.json).
2. ``bench``: a randomly initialised SD3-medium-shaped backbone (24 blocks, 24 heads x 64,
   joint_attention_dim 4096, pooled 2048, caption_projection 1536), the 23-layer teacher and a 12-layer
   student at 1024 px (128x128 latents, 4096 image tokens + 77 CLIP + 77 T5 text tokens), bf16:
   ControlNet-only and full-step (ControlNet + backbone) latency of teacher vs student, and one stage-1
   training step exactly as distillation runs it (pipeline.distill.trainer's student and DistillLoss
   through pipeline.training.train_step, with the sd3 profile's precision, gradient checkpointing and
   optimizer), samples/s and peak memory; then the same step with student, backbone and teacher
   torch.compiled block by block as ``distill.compile`` does (compile seconds, steady-state step time,
   speedup; ``--no-compile`` skips it). Timings read the clock after the GPU finished (pipeline.timing).

``--dry-run`` (or no GPU): parameter counts and the memory plan from the real configs (meta tensors,
no allocation), then exit 0 with a clear message. ``--tiny``: the benchmark code at toy size on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the pipeline package, without an install

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
    text_tokens: int = 77 + 77   # CLIP + T5 at the sd3 profile's text.max_sequence_length
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


def build(shape: Shape, device, seed: int = 0):
    """(backbone, teacher): randomly initialised directly on ``device``, frozen, float32 (distillation's
    ``place_frozen`` casts them)."""
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        backbone = SD3Transformer2DModel(num_layers=shape.blocks, **shape.transformer)
        teacher = SD3ControlNetModel(num_layers=shape.teacher_layers, extra_conditioning_channels=1,
                                     force_zeros_for_pooled_projection=True, **shape.transformer)
        with torch.no_grad():  # zero projections would make the teacher a no-op
            for blk in teacher.controlnet_blocks:
                blk.weight.normal_(0, 0.02)
    return backbone.eval().requires_grad_(False), teacher.eval().requires_grad_(False)


def inputs(shape: Shape, batch: int, device) -> dict:
    """A stage-1 batch as DistillLoss reads it (pipeline.distill.trainer.batch_from), random values."""
    from pipeline.models import inpaint

    t, lat = shape.transformer, shape.latent
    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*size):
        return torch.randn(*size, generator=g).to(device)

    mask = (torch.rand(batch, 1, lat, lat, generator=g) > 0.5).float().to(device)
    return {"latents": r(batch, t["in_channels"], lat, lat), "mask": mask,
            "control": inpaint.control_input(r(batch, t["in_channels"], lat, lat), mask),
            "prompt_embeds": r(batch, shape.text_tokens, t["joint_attention_dim"]),
            "pooled_prompt_embeds": r(batch, t["pooled_projection_dim"])}


def benchmark(shape: Shape, device="cuda", dtype=torch.bfloat16, batch: int = 1, repeats: int = 5,
              train_batch: int | None = None, compile: bool = False) -> dict:
    """Latencies of teacher and student, then one stage-1 training step: the sd3 profile's params (loss
    weights, precision ``dtype``, gradient checkpointing, optimizer, lr) through the trainer's own code.
    ``compile``: then the same step with student, backbone and teacher torch.compiled block by block, as
    ``distill.compile`` does (pipeline.distill.trainer.compile_blocks): compile seconds, steady-state step."""
    from accelerate import Accelerator

    from pipeline.config import deep_merge, from_dict
    from pipeline.distill.trainer import place_frozen, student_and_loss
    from pipeline.models.controlled import Controlled
    from pipeline.models.mapping import STUDENT_CONVENTION, TEACHER_CONVENTION
    from pipeline.profile import merged
    from pipeline.timing import median_ms
    from pipeline.training import make_optimizer, step_generator, train_step

    cuda = str(device).startswith("cuda")
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    cfg = from_dict(deep_merge(merged("sd3"), {"distill": {"mixed_precision": precision}}))
    backbone, teacher = build(shape, device)
    with torch.device(device):
        # prompt dropout (the sd3 profile's) swaps in a fixed "empty prompt": random here like the rest
        x0 = inputs(shape, 1, device)
        empty = {k: x0[k][0] for k in ("prompt_embeds", "pooled_prompt_embeds")}
        student, loss_fn = student_and_loss(cfg, "stage1", backbone, teacher, empty=empty)
    place_frozen(cfg, device, backbone, teacher)
    t_ctrl = Controlled(backbone, teacher, TEACHER_CONVENTION)
    s_ctrl = Controlled(backbone, student, STUDENT_CONVENTION)
    x = inputs(shape, batch, device)
    noisy, ts = x["latents"], torch.full((batch,), 500.0, device=device)
    args = (noisy, ts, x["prompt_embeds"], x["pooled_prompt_embeds"])
    ac = torch.autocast(device_type="cuda" if cuda else "cpu", dtype=dtype, enabled=dtype != torch.float32)
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype).removeprefix("torch."),
           "image_size": shape.image_size, "latent": shape.latent, "batch": batch,
           "image_tokens": (shape.latent // shape.transformer["patch_size"]) ** 2, "text_tokens": shape.text_tokens,
           "params_m": {k: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)
                        for k, m in (("backbone", backbone), ("teacher", teacher), ("student", student))}}

    with torch.no_grad(), ac:
        for name, c in (("teacher", t_ctrl), ("student", s_ctrl)):
            out[f"{name}_controlnet_ms"] = median_ms(lambda c=c: c.control(*args, x["control"]), 1, repeats, device)
            out[f"{name}_step_ms"] = median_ms(lambda c=c: c(*args, x["control"]), 1, repeats, device)
        out["backbone_only_step_ms"] = median_ms(lambda: s_ctrl.denoise(*args, None), 1, repeats, device)
    out["controlnet_speedup"] = out["teacher_controlnet_ms"] / out["student_controlnet_ms"]
    out["step_speedup"] = out["teacher_step_ms"] / out["student_step_ms"]

    # One stage-1 step as the trainer's Loop runs it: accelerate's autocast, DistillLoss, backward,
    # clipping, the configured optimizer.
    tb = train_batch or batch
    batch_t = inputs(shape, tb, device)
    stage = cfg.distill.stage1.train
    acc = Accelerator(mixed_precision=cfg.distill.accelerate_precision, cpu=not cuda)
    params = [p for p in student.parameters() if p.requires_grad]
    model, opt = acc.prepare(student.train(), make_optimizer(cfg.distill.optimizer, params, stage.lr,
                                                             stage.weight_decay))
    step = iter(range(10**9))

    def one_step():
        train_step(acc, model, opt, params, loss_fn, batch_t, step_generator(cfg.seed, next(step), stream=2),
                   stage.max_grad_norm)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out["train_step_ms"] = median_ms(one_step, 1, max(1, repeats // 2), device)
    out["train_batch"] = tb
    out["train_samples_per_s"] = tb / (out["train_step_ms"] / 1000)
    if cuda:
        out["train_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if compile:  # after the eager figures: compiling is in place
        from pipeline.distill.trainer import compile_blocks
        from pipeline.timing import stopwatch

        try:
            for m in (student, backbone, teacher):
                compile_blocks(m)
            with stopwatch(device) as first:
                one_step()
            out["compiled_first_step_s"] = first.seconds
            out["compiled_train_step_ms"] = median_ms(one_step, 1, max(1, repeats // 2), device)
            out["compiled_speedup"] = out["train_step_ms"] / out["compiled_train_step_ms"]
            out["compile_seconds"] = first.seconds - out["compiled_train_step_ms"] / 1000
        except Exception as exc:  # noqa: BLE001 - record why (no compiler, inductor error), fake nothing
            out["compiled"] = f"not available: {type(exc).__name__}: {str(exc)[:500]}"
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
    from pipeline.timing import stopwatch

    ws = Path(keep or tempfile.mkdtemp(prefix="gpu-smoke-")) / "ws"
    make_workspace("smoke", ws)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params.setdefault("distill", {})["mixed_precision"] = "bf16"
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "DVC_IGNORE_ISATTY": "1", "TQDM_DISABLE": "1", "GX_ANALYTICS_ENABLED": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ws)}
    with stopwatch() as wall:
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=ws, env=env, capture_output=True,
                              text=True, timeout=timeout_s)
    res = {"workspace": str(ws), "returncode": proc.returncode, "wall_s": round(wall.seconds, 1)}
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
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd training step (CUDA)")
    ap.add_argument("--compile-tiny", action="store_true", help="--tiny: also the compiled step (minutes on CPU)")
    ap.add_argument("--require-gpu", action="store_true", help="exit 2 (not 0) when there is no GPU")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    results: dict = {}
    if args.tiny:
        results["bench_tiny"] = benchmark(tiny_shape(), device="cpu", dtype=torch.float32, batch=1, repeats=1,
                                          compile=args.compile_tiny)
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
                                     args.repeats, args.train_batch, compile=not args.no_compile)
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
