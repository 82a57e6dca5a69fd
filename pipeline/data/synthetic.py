"""Synthetic inpainting scenes: shapes on textured backgrounds, instance maps, one mask per scene.

Deterministic: scene i of split s depends only on (seed, s, i), so changing one split's count changes
no other split and a larger count keeps the same first scenes. Layout of the output folder: shards/*.parquet
(pipeline.data.image_shards: per scene the PNGs of the image (RGB), mask (L, 255 = hole = repaint) and
instances (L, 0 = background, k = visible pixels of object k-1)) and manifest.parquet (see MANIFEST_COLUMNS),
whose image / mask / instances columns hold references into the shards (images.open_image reads them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from tqdm import tqdm

from pipeline.atomic import write_dir
from pipeline.config import COLORS, SPLITS, WORLD_SPLIT, ConfigError, DataConfig
from pipeline.data import prompts
from pipeline.data.image_shards import ShardWriter, png_bytes

SCENE_SPLITS = (*SPLITS, WORLD_SPLIT)
SPLIT_CODES = {name: i for i, name in enumerate(SCENE_SPLITS)}  # world last: the other splits' scenes keep their seeds
MANIFEST_COLUMNS = [
    "id", "split", "image", "mask", "instances", "mask_kind", "object_index", "objects", "background",
    "global_prompt", "local_prompt", "width", "height", "mask_fraction",
]
# Muted background tones, distinct from the saturated object colours.
BG_TONES = np.array([(200, 200, 200), (125, 125, 125), (175, 155, 130), (110, 130, 150),
                     (70, 70, 80), (150, 170, 140), (185, 165, 185)], dtype=np.float32)
MIN_VISIBLE = 0.3            # each object keeps >= 30% of its own pixels visible (and >= 3 px)
MASK_FRACTION_BOUNDS = (0.01, 0.95)
MAX_TRIES = 200


@dataclass
class Scene:
    image: np.ndarray           # (H, W, 3) uint8
    instances: np.ndarray       # (H, W) uint8, 0 = background, k = object k-1
    mask: np.ndarray            # (H, W) bool, True = hole
    objects: list[dict]
    background: str
    mask_kind: str              # object | box | stroke
    object_index: int           # -1 for random masks
    global_prompt: str = ""
    local_prompt: str = ""
    extra: dict = field(default_factory=dict)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_CODES[split], index])


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean footprint of a shape of half-side r centred at (cx, cy) (pixel centres at +0.5)."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    dx = coords[None, :] - cx
    dy = coords[:, None] - cy
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (ax <= r) & (ay <= r)
    if shape == "triangle":  # apex up
        return (ay <= r) & (ax <= (dy + r) / 2)
    if shape == "diamond":
        return ax + ay <= r
    if shape == "cross":
        t = max(r / 3, 0.75)
        return ((ax <= t) & (ay <= r)) | ((ay <= t) & (ax <= r))
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"data.shapes: unknown shape {shape!r}")


def background_texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    i, j = rng.choice(len(BG_TONES), size=2, replace=False)
    c1, c2 = BG_TONES[i], BG_TONES[j]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = int(rng.integers(max(3, size // 10), max(4, size // 4) + 1))
    if kind == "plain":
        t = np.zeros((size, size), np.float32)
    elif kind == "striped":
        axis = [yy, xx, xx + yy][int(rng.integers(3))]
        t = ((axis // period) % 2).astype(np.float32)
    elif kind == "checkered":
        t = (((xx // period) + (yy // period)) % 2).astype(np.float32)
    elif kind == "dotted":
        p = max(period, 4)
        dx = (xx % p) - p / 2 + 0.5
        dy = (yy % p) - p / 2 + 0.5
        t = (dx**2 + dy**2 <= (p / 4) ** 2 + 0.5).astype(np.float32)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        proj = np.cos(angle) * xx + np.sin(angle) * yy
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    else:
        raise ValueError(f"data.backgrounds: unknown background {kind!r}")
    return c1 * (1 - t[..., None]) + c2 * t[..., None]


def _place_objects(cfg: DataConfig, rng: np.random.Generator):
    size = cfg.image_size
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    for _ in range(MAX_TRIES):
        objects, footprints = [], []
        instances = np.zeros((size, size), np.uint8)
        for layer in range(n):
            side = max(3.0, rng.uniform(cfg.min_object_size, cfg.max_object_size) * size)
            r = side / 2
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            shape = str(cfg.shapes[int(rng.integers(len(cfg.shapes)))])
            color = str(cfg.colors[int(rng.integers(len(cfg.colors)))])
            fp = shape_mask(shape, cx, cy, r, size)
            ys, xs = np.nonzero(fp)
            bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            objects.append({"shape": shape, "color": color, "bbox": bbox, "layer": layer})
            footprints.append(fp)
            instances[fp] = layer + 1
        visible = [int((instances == k + 1).sum()) for k in range(n)]
        if all(v >= max(3, MIN_VISIBLE * fp.sum()) for v, fp in zip(visible, footprints)):
            return objects, instances
    raise ConfigError(
        f"data.max_objects: could not place {n} objects of size {cfg.min_object_size}-{cfg.max_object_size} "
        f"in a {size}px image with each visible after {MAX_TRIES} tries"
    )


def dilate(mask: np.ndarray, px: int = 1) -> np.ndarray:
    out = mask.copy()
    for _ in range(px):
        m = out.copy()
        m[1:, :] |= out[:-1, :]
        m[:-1, :] |= out[1:, :]
        m[:, 1:] |= out[:, :-1]
        m[:, :-1] |= out[:, 1:]
        m[1:, 1:] |= out[:-1, :-1]
        m[:-1, :-1] |= out[1:, 1:]
        m[1:, :-1] |= out[:-1, 1:]
        m[:-1, 1:] |= out[1:, :-1]
        out = m
    return out


def random_box(size: int, rng: np.random.Generator) -> np.ndarray:
    lo, hi = max(2, int(0.15 * size)), max(3, int(0.6 * size))
    w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
    m = np.zeros((size, size), bool)
    m[y0:y0 + h, x0:x0 + w] = True
    return m


def random_stroke(size: int, rng: np.random.Generator) -> np.ndarray:
    """A brush stroke: a thick polyline of 2-4 segments (random walk)."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    width = int(rng.integers(max(2, size // 16), max(3, size // 5) + 1))
    pts = [tuple(rng.uniform(0, size, 2))]
    for _ in range(int(rng.integers(2, 5))):
        angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.5) * size
        x, y = pts[-1]
        pts.append((float(np.clip(x + length * np.cos(angle), 0, size - 1)),
                    float(np.clip(y + length * np.sin(angle), 0, size - 1))))
    draw.line(pts, fill=255, width=width, joint="curve")
    for x, y in (pts[0], pts[-1]):
        draw.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=255)
    return np.asarray(img) > 127


def random_mask(size: int, rng: np.random.Generator, kind: str | None = None) -> tuple[np.ndarray, str]:
    """A random box or stroke hole covering a fraction within MASK_FRACTION_BOUNDS."""
    lo, hi = MASK_FRACTION_BOUNDS
    for _ in range(MAX_TRIES):
        k = kind or ("box" if rng.random() < 0.5 else "stroke")
        m = random_box(size, rng) if k == "box" else random_stroke(size, rng)
        if lo <= m.mean() <= hi:
            return m, k
    raise RuntimeError(f"could not draw a random {kind or 'box/stroke'} mask within {MASK_FRACTION_BOUNDS}")


def make_scene(cfg: DataConfig, rng: np.random.Generator) -> Scene:
    size = cfg.image_size
    objects, instances = _place_objects(cfg, rng)
    background = str(cfg.backgrounds[int(rng.integers(len(cfg.backgrounds)))])
    image = background_texture(background, size, rng)
    for k, obj in enumerate(objects):
        image[instances == k + 1] = COLORS[obj["color"]]
    image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)

    if rng.random() < cfg.random_mask_fraction:
        mask, kind = random_mask(size, rng)
        index = -1
        local = prompts.local_prompt_for_mask(objects, background, instances, mask)
    else:
        index = int(rng.integers(len(objects)))
        mask, kind = dilate(instances == index + 1, 1), "object"
        local = prompts.local_prompt(objects, background, [index])
    return Scene(image, instances, mask, objects, background, kind, index,
                 prompts.global_prompt(objects, background), local)


def write_scene(scene: Scene, shards: ShardWriter, scene_id: str) -> dict:
    refs = shards.add(scene_id, {"image": png_bytes(scene.image, "RGB"), "mask": png_bytes(scene.mask, "L"),
                                 "instances": png_bytes(scene.instances, "L")})
    h, w = scene.mask.shape
    return {
        "id": scene_id, **refs,
        "mask_kind": scene.mask_kind, "object_index": scene.object_index,
        "objects": json.dumps(scene.objects), "background": scene.background,
        "global_prompt": scene.global_prompt, "local_prompt": scene.local_prompt,
        "width": w, "height": h, "mask_fraction": float(scene.mask.mean()),
    }


def split_counts(cfg: DataConfig) -> dict[str, int]:
    return {name: getattr(cfg.splits, name) for name in SCENE_SPLITS}


def generate_scenes(cfg: DataConfig, seed: int, out: str | Path, progress: bool = True) -> pd.DataFrame:
    """Render every split into `out` (atomically) and return the manifest."""
    out = Path(out)
    counts = split_counts(cfg)
    with write_dir(out) as tmp:
        rows = []
        with ShardWriter(tmp) as shards, \
                tqdm(total=sum(counts.values()), desc="scenes", disable=not progress) as bar:
            for split, n in counts.items():
                for i in range(n):
                    scene_id = f"{split}-{i:06d}"
                    row = write_scene(make_scene(cfg, scene_rng(seed, split, i)), shards, scene_id)
                    rows.append({"split": split, **row})
                    bar.update()
        df = pd.DataFrame(rows)[MANIFEST_COLUMNS]
        df.to_parquet(tmp / "manifest.parquet", index=False)
    return df
