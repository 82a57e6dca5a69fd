"""`pseudo_labeller` backend: a small CNN that captions the unlabelled split in Qwen2.5-VL's role.

Stage 2 trains on masked images whose local prompts come from a vision-language model, never from ground
truth. In the tiny world that model is this one: it reads the image (RGB in [-1, 1]) and gives every pixel its
(colour, shape) group of the params' data section or background, and the layer of the object there, plus the
scene's background texture and each group's object count. The mask enters only at decoding, through
annotate's covering rule (a group is under the mask when at least prompts.COVER_THRESHOLD of its pixels are in
the hole); groups are listed by their pixels' mean layer (the grammar's order). The global prompt is the same
reading without the mask. Predictions are rendered by pipeline.data.prompts, so the text has exactly the
annotations' grammar and the two are compared string for string.

Targets come from the labelled split's instance maps and objects records. Captioning reads only each row's
image and mask files. Saved as model.safetensors + config.json (no pickle). Val accuracy is still short of
the goal (see params.yaml caption.pseudo_labeller): per-pixel shape classification is the weak part.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from pipeline.config import DataConfig, PseudoLabellerConfig
from pipeline.data import prompts
from pipeline.data.images import load_mask, open_image, read_images, read_masks

FORMAT = "refine-control pseudo_labeller"
IGNORE = -100  # no layer target for a group that is absent (or a background pixel)
MIN_AREA = 0.024  # share of the image a group's pixels need to count as in it (smaller: stray pixels)


@dataclass(frozen=True)
class Vocab:
    """What the heads can say: the data section's backgrounds, colours x shapes, and counts."""
    backgrounds: tuple[str, ...]
    colors: tuple[str, ...]
    shapes: tuple[str, ...]
    min_objects: int
    max_objects: int

    @classmethod
    def from_data(cls, data: DataConfig) -> "Vocab":
        return cls(tuple(data.backgrounds), tuple(data.colors), tuple(data.shapes), data.min_objects, data.max_objects)

    @property
    def groups(self) -> list[tuple[str, str]]:
        return [(c, s) for c in self.colors for s in self.shapes]


@dataclass
class Reading:
    """What the model says about one region: the background and the objects, in prompt order."""
    background: str
    objects: list[dict]  # {color, shape}

    def local(self) -> str:
        return prompts.local_prompt(self.objects, self.background, list(range(len(self.objects))))

    def global_(self) -> str:
        return prompts.global_prompt(self.objects, self.background)


class SceneReader(nn.Module):
    """Reads the image alone (the mask enters only at decoding, through the covering rule).

    Conv-BN-ReLU blocks (the first at full resolution, each later one halves the side); a dense head at the
    second block's resolution (every later block upsampled to it, plus the pooled scene) gives each pixel its
    (colour, shape) group or background and the layer of the object there; linear heads on the pooled scene
    give the background texture and each group's object count."""

    def __init__(self, channels: tuple[int, ...], n_backgrounds: int, n_groups: int, max_objects: int):
        super().__init__()
        blocks, c_in = [], 3
        for i, c in enumerate(channels):
            layers = [nn.Conv2d(c_in, c, 3, 1 if i == 0 else 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            blocks.append(nn.Sequential(*layers))
            c_in = c
        self.blocks = nn.ModuleList(blocks)
        self.n_groups, self.max_objects = n_groups, max_objects
        self.dense_from = min(1, len(channels) - 1)
        pooled = 2 * sum(channels[self.dense_from:])
        hidden = channels[-1]
        self.dense_in = nn.Conv2d(sum(channels[self.dense_from:]), hidden, 1)
        self.dense_scene = nn.Linear(pooled, hidden, bias=False)  # the pooled scene, added at every pixel
        self.dense_out = nn.Conv2d(hidden, 1 + n_groups + max_objects, 1)
        self.background = nn.Linear(pooled, n_backgrounds)
        self.count = nn.Linear(pooled, n_groups * (max_objects + 1))

    def forward(self, image: torch.Tensor):
        """(group logits (B,1+G,S,S), layer logits (B,L,S,S), background logits, count logits (B,G,L+1))."""
        feats, h = [], image
        for blk in self.blocks:
            h = blk(h)
            feats.append(h)
        feats = feats[self.dense_from:]
        side = feats[0].shape[-2:]
        pooled = torch.cat([f.mean((2, 3)) for f in feats] + [f.amax((2, 3)) for f in feats], 1)
        up = [f if f.shape[-2:] == side else F.interpolate(f, size=side, mode="nearest") for f in feats]
        dense = self.dense_out(F.relu(self.dense_in(torch.cat(up, 1)) + self.dense_scene(pooled)[:, :, None, None]))
        dense = F.interpolate(dense, size=image.shape[-2:], mode="bilinear", align_corners=False)
        b = image.shape[0]
        return (dense[:, :1 + self.n_groups], dense[:, 1 + self.n_groups:], self.background(pooled),
                self.count(pooled).view(b, self.n_groups, self.max_objects + 1))


# ------------------------------------------------------------------------------------------ targets

def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and str(v).strip() != ""


def covered_indices(row: dict) -> list[int]:
    """The objects under the row's mask, by annotate's rule: the object whose mask it is, else the objects
    mostly inside the hole (pipeline.data.prompts.covered_objects on the instance map)."""
    objects = json.loads(row["objects"])
    idx = row.get("object_index")
    if _present(idx) and int(idx) >= 0:
        return [int(idx)]
    if not _present(row.get("instances")):
        raise ValueError(f"row {row['id']}: no object_index and no instance map; cannot tell what the mask covers")
    inst = np.asarray(open_image(row["instances"]).convert("L"))
    return prompts.covered_objects(inst, load_mask(row["mask"]), len(objects))


def reading_targets(objects: list[dict], background: str, chosen: list[int], vocab: Vocab):
    """(background index, count per group, layer of each group's first object or IGNORE)."""
    index = {g: i for i, g in enumerate(vocab.groups)}
    counts = [0] * len(index)
    first = [IGNORE] * len(index)
    for k in sorted(chosen):
        obj = objects[k]
        key = (obj["color"], obj["shape"])
        if key not in index or background not in vocab.backgrounds:
            raise ValueError(f"object {key} on {background!r} is outside the data section's vocabulary")
        g = index[key]
        counts[g] = min(counts[g] + 1, vocab.max_objects)
        if first[g] == IGNORE:
            first[g] = min(k, vocab.max_objects - 1)
    return vocab.backgrounds.index(background), counts, first


def labelled_targets(rows: list[dict], vocab: Vocab) -> dict[str, torch.Tensor]:
    """Targets of the local reading (the row's mask) and of the global reading (every object)."""
    out = {k: [] for k in ("bg", "count", "first", "g_count", "g_first")}
    for r in rows:
        if not _present(r.get("objects")):
            raise ValueError(f"row {r['id']}: no objects record; the pseudo-labeller trains on annotated rows only")
        objects = json.loads(r["objects"])
        bg, c, f = reading_targets(objects, r["background"], covered_indices(r), vocab)
        _, gc, gf = reading_targets(objects, r["background"], list(range(len(objects))), vocab)
        for k, v in zip(out, (bg, c, f, gc, gf)):
            out[k].append(v)
    return {k: torch.tensor(v) for k, v in out.items()}


def read_inputs(rows: list[dict], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B,3,S,S) in [-1, 1] and masks (B,1,S,S) in {0, 1}, from the rows' image and mask files only."""
    return read_images([r["image"] for r in rows], size), read_masks([r["mask"] for r in rows], size)


# ------------------------------------------------------------------------------------------ the model

class PseudoLabeller:
    def __init__(self, model: SceneReader, vocab: Vocab, image_size: int, channels: tuple[int, ...],
                 device: torch.device | str = "cpu"):
        self.model, self.vocab, self.image_size, self.channels = model, vocab, image_size, tuple(channels)
        self.device = torch.device(device)
        self.model.to(self.device)

    @classmethod
    def new(cls, vocab: Vocab, image_size: int, channels: tuple[int, ...], device="cpu") -> "PseudoLabeller":
        model = SceneReader(tuple(channels), len(vocab.backgrounds), len(vocab.groups), vocab.max_objects)
        return cls(model, vocab, image_size, channels, device)

    def decode(self, outputs, masks: torch.Tensor) -> tuple[list[Reading], list[Reading]]:
        """(local readings under `masks`, global readings) from one pass over the images.

        Each pixel takes its likeliest group (or background); a group is in the image when it holds at least
        MIN_AREA of the image, and under the mask by annotate's rule: at least prompts.COVER_THRESHOLD of its
        pixels in the hole. Groups are listed by the mean layer of their pixels (the grammar's order)."""
        group_logits, layer_logits, bg, count = outputs
        groups, n_groups = self.vocab.groups, len(self.vocab.groups)
        label = group_logits.argmax(1)  # (B,S,S): 0 = background, 1 + g
        onehot = F.one_hot(label, 1 + n_groups)[..., 1:].float()  # (B,S,S,G)
        area = onehot.sum((1, 2))
        inside = (onehot * masks[:, 0, :, :, None]).sum((1, 2))
        layer = (layer_logits.softmax(1) * torch.arange(layer_logits.shape[1], device=label.device)[:, None, None]
                 ).sum(1)  # (B,S,S) expected layer
        mean_layer = (onehot * layer[..., None]).sum((1, 2)) / area.clamp_min(1)
        counts = count.argmax(-1)
        local, glob = [], []
        for b in range(label.shape[0]):
            present = [g for g in range(n_groups) if area[b, g] >= MIN_AREA * label[b].numel()]
            # a scene holds at least one object (data.min_objects) and at most data.max_objects
            if not present:
                present = [int(area[b].argmax())]
            present = sorted(present, key=lambda g: -float(area[b, g]))
            n_of, room = {}, self.vocab.max_objects
            for g in present:
                if room > 0:
                    n_of[g] = min(max(1, int(counts[b, g])), room)
                    room -= n_of[g]
            order = sorted(n_of, key=lambda g: (float(mean_layer[b, g]), g))
            background = self.vocab.backgrounds[int(bg[b].argmax())]
            glob.append(Reading(background, [{"color": groups[g][0], "shape": groups[g][1]}
                                             for g in order for _ in range(n_of[g])]))
            objects = []
            for g in order:
                frac = float(inside[b, g] / area[b, g])
                if frac >= prompts.COVER_THRESHOLD:
                    # several objects of a group: the share of them the hole holds (at least one)
                    k = min(n_of[g], max(1, round(frac * n_of[g])))
                    objects += [{"color": groups[g][0], "shape": groups[g][1]}] * k
            local.append(Reading(background, objects))
        return local, glob

    @torch.no_grad()
    def read(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[list[Reading], list[Reading]]:
        """(local readings under `masks`, global readings of the whole images)."""
        self.model.eval()
        return self.decode(self.model(images.to(self.device)), masks.to(self.device))

    def read_rows(self, rows: list[dict], batch_size: int = 256, progress: bool = False):
        local, glob = [], []
        for start in tqdm(range(0, len(rows), batch_size), desc="pseudo_labeller", disable=not progress):
            lo, gl = self.read(*read_inputs(rows[start:start + batch_size], self.image_size))
            local += lo
            glob += gl
        return local, glob

    def save(self, out: str | Path) -> None:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": FORMAT})
        config = {"format": FORMAT, "version": 1, "image_size": self.image_size, "channels": list(self.channels),
                  **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.vocab).items()}}
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "PseudoLabeller":
        from safetensors.torch import load_file

        path = Path(path)
        cfg_file, weights = path / "config.json", path / "model.safetensors"
        if not cfg_file.is_file() or not weights.is_file():
            raise FileNotFoundError(f"{path}: no pseudo-labeller (config.json + model.safetensors); run the "
                                    "pseudo_labeller stage")
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{cfg_file}: format {cfg.get('format')!r}, expected {FORMAT!r}")
        vocab = Vocab(tuple(cfg["backgrounds"]), tuple(cfg["colors"]), tuple(cfg["shapes"]),
                      cfg["min_objects"], cfg["max_objects"])
        pl = cls.new(vocab, cfg["image_size"], tuple(cfg["channels"]))
        pl.model.load_state_dict(load_file(str(weights)))
        pl.model.to(torch.device(device)).eval()
        pl.device = torch.device(device)
        return pl


# ------------------------------------------------------------------------------------------ training

def _loss(outputs, group, layer, bg, count) -> torch.Tensor:
    group_logits, layer_logits, bg_logits, count_logits = outputs
    # counts: averaged over groups and rows (whether a group is there at all comes from the dense head)
    count_loss = F.cross_entropy(count_logits.flatten(0, 1), count.flatten())
    layer_loss = F.cross_entropy(layer_logits, layer, ignore_index=IGNORE) if (layer != IGNORE).any() \
        else count_loss * 0
    return F.cross_entropy(group_logits, group) + layer_loss + F.cross_entropy(bg_logits, bg) + count_loss


def dense_targets(objects: list[dict], instances: np.ndarray, vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: 0 (background) or 1 + the group of the object there; the object's layer (IGNORE off objects)."""
    index = {g: i for i, g in enumerate(vocab.groups)}
    lut_group = np.zeros(256, np.int64)
    lut_layer = np.full(256, IGNORE, np.int64)
    for k, obj in enumerate(objects):
        lut_group[k + 1] = 1 + index[(obj["color"], obj["shape"])]
        lut_layer[k + 1] = min(k, vocab.max_objects - 1)
    return lut_group[instances], lut_layer[instances]


def _load_instances(rows: list[dict], size: int) -> torch.Tensor:
    """Instance maps (B,S,S) uint8 (0 = background, k = object k-1), resized with nearest at `size`."""
    out = []
    for r in rows:
        img = open_image(r["instances"]).convert("L")
        if img.size != (size, size):
            img = img.resize((size, size), Image.NEAREST)
        out.append(np.asarray(img))
    return torch.from_numpy(np.stack(out))


def train(rows: list[dict], cfg: PseudoLabellerConfig, data: DataConfig, seed: int,
          progress: bool = True) -> tuple[PseudoLabeller, dict]:
    """Train on annotated rows (image, mask, objects, background, object_index, instances); seeded.

    The model reads images only: it learns each pixel's group and layer from the instance maps and the scene's
    background and group counts from the objects records; the mask enters at decoding (annotate's covering
    rule), so no mask is drawn here. The split is held in memory at cfg.image_size (images and per-pixel
    targets: ~16 bytes a pixel, 2,048 rows at 32 px ~ 34 MB), whatever data.image_size is: rows are resized
    on reading; read the rows in chunks if this does not fit."""
    from pipeline.runtime import resolve_device

    if not rows:
        raise ValueError("pseudo-labeller: no labelled rows to train on")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = resolve_device(cfg.device)
    vocab = Vocab.from_data(data)
    images = read_images([r["image"] for r in rows], cfg.image_size)
    instances = _load_instances(rows, cfg.image_size).numpy()
    t = labelled_targets(rows, vocab)
    dense = [dense_targets(json.loads(r["objects"]), inst, vocab) for r, inst in zip(rows, instances)]
    group = torch.from_numpy(np.stack([d[0] for d in dense]).astype(np.int16))
    layer = torch.from_numpy(np.stack([d[1] for d in dense]).astype(np.int16))
    del dense, instances
    pl = PseudoLabeller.new(vocab, cfg.image_size, cfg.channels, device)
    model = pl.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total = cfg.epochs * per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=total, pct_start=0.15)
    bar = tqdm(total=total, desc="pseudo_labeller", disable=not progress)
    loss = torch.zeros(())
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(rows), generator=gen)
        for start in range(0, len(rows), cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            x, g, lay = images[idx], group[idx].long(), layer[idx].long()
            # horizontal flips: every shape is left-right symmetric, so the targets stay the same
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            g = torch.where(flip[:, None, None], g.flip(-1), g)
            lay = torch.where(flip[:, None, None], lay.flip(-1), lay)
            loss = _loss(model(x.to(device)), g.to(device), lay.to(device), t["bg"][idx].to(device),
                         t["g_count"][idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return pl, {"rows": len(rows), "steps": total, "final_loss": float(loss.item()),
                "seconds": round(time.perf_counter() - t0, 2), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------ evaluation

def _multiset(objects: list[dict]) -> Counter:
    return Counter((o["color"], o["shape"]) for o in objects)


def evaluate(pl: PseudoLabeller, rows: list[dict], progress: bool = False) -> dict:
    """Exact match of the rendered prompts against the annotations' (annotate's rule), and per-attribute
    accuracies of both readings. `majority_*`: the share of the commonest prompt (what a constant guess gets)."""
    from pipeline.captions.annotations import annotate

    local, glob = pl.read_rows(rows, progress=progress)
    truth = [annotate(r) for r in rows]
    n = len(rows)
    m = {"rows": n,
         "local_exact_match": sum(p.local() == t[0] for p, t in zip(local, truth)) / n,
         "global_exact_match": sum(p.global_() == t[1] for p, t in zip(glob, truth)) / n,
         "majority_local_exact_match": Counter(t[0] for t in truth).most_common(1)[0][1] / n,
         "majority_global_exact_match": Counter(t[1] for t in truth).most_common(1)[0][1] / n}
    for name, preds in (("local", local), ("global", glob)):
        hits = Counter()
        for r, p in zip(rows, preds):
            objects = json.loads(r["objects"])
            chosen = covered_indices(r) if name == "local" else range(len(objects))
            true = [objects[k] for k in sorted(chosen)]
            ts, ps = _multiset(true), _multiset(p.objects)
            hits["background"] += p.background == r["background"]
            hits["objects"] += ts == ps  # the object groups and counts, in any order
            hits["colors"] += {c for c, _ in ts} == {c for c, _ in ps}
            hits["shapes"] += {s for _, s in ts} == {s for _, s in ps}
            hits["count"] += sum(ts.values()) == sum(ps.values())
        m[f"{name}_accuracy"] = {k: hits[k] / n for k in ("background", "objects", "colors", "shapes", "count")}
    return m


# ------------------------------------------------------------------------------------------ captioner

class PseudoLabellerCaptioner:
    """QwenCaptioner's interface: caption(rows, cache, progress) -> [(local, global)] per row."""

    def __init__(self, path: str | Path, cfg: PseudoLabellerConfig, batch_size: int = 256):
        from pipeline.runtime import resolve_device

        self.labeller = PseudoLabeller.load(path, resolve_device(cfg.device))
        self.batch_size = batch_size

    def caption(self, rows: list[dict], cache=None, progress: bool = True) -> list[tuple[str, str]]:
        """`cache` is accepted for the interface and unused: a forward pass costs less than hashing the files,
        and the model folder is a DVC dep of the caption stage, so its captions are recomputed on change."""
        # only the image and mask paths go further: annotation columns of the row cannot leak into a caption
        views = [{"image": r["image"], "mask": r["mask"]} for r in rows]
        local, glob = self.labeller.read_rows(views, self.batch_size, progress)
        return [(lo.local(), gl.global_()) for lo, gl in zip(local, glob)]


# ------------------------------------------------------------------------------------------ the stage

class BelowThreshold(RuntimeError):
    """Val local exact match under caption.pseudo_labeller.min_exact_match."""


UNUSED_README = """# pseudo_labeller: unused

`caption.unlabelled_backend` is {backend!r}, so the caption stage does not read this folder and the
pseudo_labeller stage trained nothing. It exists because it is a DVC output (and a dep of `caption`).
"""


def build(cfg, manifest: str | Path, out: str | Path, metrics_path: str | Path, progress: bool = True) -> dict:
    """The pseudo_labeller stage: train on the labelled split, evaluate on val, write the model folder
    (atomically) and the metrics; BelowThreshold when val local exact match is under the params' minimum
    (metrics written, model not). With another unlabelled backend: a README-only folder, {"used": false}."""
    from pipeline.atomic import write_dir
    from pipeline.data.images import load_manifest
    from pipeline.metrics_io import write_json

    ccfg = cfg.caption
    if ccfg.unlabelled_backend != "pseudo_labeller":
        with write_dir(out) as tmp:
            (tmp / "README.md").write_text(UNUSED_README.format(backend=ccfg.unlabelled_backend))
        metrics = {"used": False, "unlabelled_backend": ccfg.unlabelled_backend}
        write_json(metrics_path, metrics)
        return metrics
    rows = load_manifest(manifest).to_dict("records")
    split = {s: [r for r in rows if r["split"] == s] for s in ("labelled", "val")}
    for s, got in split.items():
        missing = [r["id"] for r in got if not _present(r.get("objects"))]
        if not got or missing:
            raise ValueError(
                f"{manifest}: the pseudo-labeller needs annotated {s} rows (objects, background); "
                + (f"{len(missing)} have none (first: {missing[0]})" if missing else "there are none")
                + ". For data without annotations set caption.unlabelled_backend: qwen2_5_vl")
    pcfg = ccfg.pseudo_labeller
    pl, info = train(split["labelled"], pcfg, cfg.data, cfg.seed, progress)
    metrics = {"used": True, "train": info, "val": evaluate(pl, split["val"]),
               "min_exact_match": pcfg.min_exact_match}
    got = metrics["val"]["local_exact_match"]
    metrics["passed"] = pcfg.min_exact_match is None or got >= pcfg.min_exact_match
    write_json(metrics_path, metrics)
    if not metrics["passed"]:
        raise BelowThreshold(
            f"val local-prompt exact match {got:.3f} < caption.pseudo_labeller.min_exact_match "
            f"{pcfg.min_exact_match} ({metrics_path}); {out} not written. Train longer (epochs) or lower the bar")
    with write_dir(out) as tmp:
        pl.save(tmp)
    return metrics
