"""The report's PNG figures: sample grid, PSNR vs ControlNet-parameters frontier, loss curves.
Each returns the written path, or None when its inputs do not exist yet."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

FIXED_COLUMNS = ("masked_input", "mask", "ground_truth")


def save(fig, out: Path, dpi: int = 110) -> Path:
    """Every figure's tail (the report's and the studies'): lay out, write the PNG at ``dpi``, free it."""
    out = Path(out)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def sample_grid(samples_dir: Path, out: Path) -> Path | None:
    """Rows: test images; columns: masked input, mask, ground truth, then each model (as evaluate wrote)."""
    files = sorted(Path(samples_dir).glob("*.png"))
    if not files:
        return None
    grid: dict[int, dict[str, Path]] = {}
    for p in files:
        m = re.fullmatch(r"(\d+)_(.+)", p.stem)
        if m:
            grid.setdefault(int(m.group(1)), {})[m.group(2)] = p
    models = [c for c in grid[min(grid)] if c not in FIXED_COLUMNS]
    order = ["teacher", "backbone_only", "student_stage1", "student"]
    models.sort(key=lambda c: (order.index(c) if c in order else len(order), c))
    cols = [c for c in FIXED_COLUMNS if c in grid[min(grid)]] + models
    rows = sorted(grid)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.6 * len(cols), 1.6 * len(rows)), squeeze=False)
    for r, i in enumerate(rows):
        for k, col in enumerate(cols):
            ax = axes[r][k]
            ax.axis("off")
            if col in grid[i]:
                img = np.asarray(Image.open(grid[i][col]))
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest", vmin=0, vmax=255)
            if r == 0:
                ax.set_title(col.replace("_", " "), fontsize=8)
    return save(fig, out)


def frontier(c: dict, summary: dict, out: Path) -> Path | None:
    """Whole-image PSNR against ControlNet parameters: teacher, main students, ablation variants
    (seed-averaged mean with its bootstrap CI over test images); the backbone alone (no ControlNet) as a
    horizontal line."""
    ev, abl = c["eval"], summary["ablations"]
    if not ev and not abl:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in ev.items():
        if m.get("controlnet_params"):
            ax.scatter(m["controlnet_params"], m["psnr"], marker="*" if name == "teacher" else "o", s=80, zorder=3)
            ax.annotate(name, (m["controlnet_params"], m["psnr"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    for variant, s in summary["study"]["variants"].items():
        params = abl.get(variant, {}).get("controlnet_params")
        if params:
            m, ci = s["psnr_mean"], s["psnr_ci"]
            ax.errorbar(params, m, yerr=[[m - ci["ci_low"]], [ci["ci_high"] - m]], fmt="s", ms=4, alpha=0.7,
                        capsize=2, color="tab:gray")
            ax.annotate(variant, (params, m), fontsize=6, xytext=(4, -8), textcoords="offset points",
                        color="tab:gray")
    if "backbone_only" in ev:
        ax.axhline(ev["backbone_only"]["psnr"], ls="--", color="tab:red", lw=1, label="backbone alone (no control)")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("ControlNet parameters")
    ax.set_ylabel("PSNR (dB), whole image")
    ax.set_title("Quality vs size (grey: ablations, seed mean, CI over images)", fontsize=9)
    ax.grid(alpha=0.3)
    return save(fig, out)


def read_tsv(path: Path) -> tuple[list[float], list[float]]:
    steps, values = [], []
    with open(path) as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            name = next(k for k in row if k not in ("step", "timestamp"))
            steps.append(float(row["step"]))
            values.append(float(row[name]))
    return steps, values


def loss_curves(dvclive_dir: Path, stages: list[str], out: Path) -> Path | None:
    """Each loss term per DVC stage from dvclive's TSVs (dvclive/<stage>/plots/metrics/<loop>/<term>.tsv)."""
    panels = []
    for stage in stages:
        d = Path(dvclive_dir) / stage / "plots" / "metrics"
        terms = sorted(p for p in d.glob("*/*.tsv") if p.stem not in ("lr", "samples_per_s"))
        if terms:
            panels.append((stage, terms))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (stage, terms) in zip(axes[0], panels):
        for p in terms:
            x, y = read_tsv(p)
            if x:
                ax.plot(x, y, label=p.stem, lw=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(stage)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return save(fig, out)
