"""`pseudo_labeller` backend: a small CNN that captions the unlabelled split in Qwen2.5-VL's role.

Stage 2 trains on masked images whose local prompts come from a vision-language model, never from ground
truth. In the tiny world that model is this one: it reads an image and a mask (4 channels: RGB in [-1, 1],
mask in {-1, 1}) and predicts the background and, for every (colour, shape) group of the params' data
section, how many of its objects lie under the mask (0..data.max_objects) and the layer of the first one (the
prompt grammar lists groups in layer order). The same network with an all-ones mask reads the whole image:
the global prompt. Predictions are rendered by pipeline.data.prompts, so the text has exactly the
annotations' grammar and the two are compared string for string.

Targets come from the labelled split's annotations with the rule of pipeline.captions.annotations.annotate
(object_index when the mask is an object's, else the instance map's covered objects). Captioning reads only
each row's image and mask files. Saved as model.safetensors + config.json (no pickle).
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
from pipeline.data.images import load_mask, read_images, read_masks

FORMAT = "refine-control pseudo_labeller"
IGNORE = -100  # no layer target for a group that is absent


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


class RegionReader(nn.Module):
    """Conv-BN-ReLU blocks (each after the first halves the side), pooled over the image and over the mask,
    three linear heads."""

    def __init__(self, channels: tuple[int, ...], n_backgrounds: int, n_groups: int, max_objects: int):
        super().__init__()
        layers, c_in = [], 4
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 3, 1 if i == 0 else 2, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.n_groups, self.max_objects = n_groups, max_objects
        self.background = nn.Linear(4 * c_in, n_backgrounds)
        self.count = nn.Linear(4 * c_in, n_groups * (max_objects + 1))
        self.first = nn.Linear(4 * c_in, n_groups * max_objects)

    def forward(self, image: torch.Tensor, mask: torch.Tensor):
        h = self.features(torch.cat([image, mask * 2 - 1], 1))
        # mean pooling keeps how much of each thing there is (counts), max pooling that it is there at all;
        # both again over the hole only, which hands the heads the region's own features (the local reading)
        m = F.adaptive_avg_pool2d(mask, h.shape[-2:])
        inside = (h * m).sum((2, 3)) / m.sum((2, 3)).clamp_min(1e-6)
        inside_max = h.masked_fill(m <= 0, 0).amax((2, 3))  # ReLU features: 0 is their floor
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3)), inside, inside_max], 1)
        b = h.shape[0]
        return (self.background(h), self.count(h).view(b, self.n_groups, self.max_objects + 1),
                self.first(h).view(b, self.n_groups, self.max_objects))


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
    inst = np.asarray(Image.open(row["instances"]).convert("L"))
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
    def __init__(self, model: RegionReader, vocab: Vocab, image_size: int, channels: tuple[int, ...],
                 device: torch.device | str = "cpu"):
        self.model, self.vocab, self.image_size, self.channels = model, vocab, image_size, tuple(channels)
        self.device = torch.device(device)
        self.model.to(self.device)

    @classmethod
    def new(cls, vocab: Vocab, image_size: int, channels: tuple[int, ...], device="cpu") -> "PseudoLabeller":
        model = RegionReader(tuple(channels), len(vocab.backgrounds), len(vocab.groups), vocab.max_objects)
        return cls(model, vocab, image_size, channels, device)

    def decode(self, bg: torch.Tensor, count: torch.Tensor, first: torch.Tensor, whole: bool) -> list[Reading]:
        groups = self.vocab.groups
        counts = count.argmax(-1)
        if whole:
            # a scene has at least data.min_objects objects: a whole-image reading that finds none names the
            # likeliest group (else the global prompt would be a bare background, like a local one)
            empty = counts.sum(1) == 0
            counts[empty, (1 - count.softmax(-1)[..., 0])[empty].argmax(-1)] = 1
        layer = (first.softmax(-1) * torch.arange(first.shape[-1], device=first.device)).sum(-1)
        present = 1 - count.softmax(-1)[..., 0]
        out = []
        for b in range(bg.shape[0]):
            # a scene holds at most data.max_objects objects: keep the surest groups up to that many (an
            # undertrained model would otherwise name dozens)
            kept, room = {}, self.vocab.max_objects
            for g in sorted(torch.nonzero(counts[b]).flatten().tolist(), key=lambda g: -present[b, g].item()):
                if room > 0:
                    kept[g] = min(int(counts[b, g]), room)
                    room -= kept[g]
            order = sorted(kept, key=lambda g: (layer[b, g].item(), g))  # the grammar lists groups in layer order
            objects = [{"color": groups[g][0], "shape": groups[g][1]} for g in order for _ in range(kept[g])]
            out.append(Reading(self.vocab.backgrounds[int(bg[b].argmax())], objects))
        return out

    @torch.no_grad()
    def read(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[list[Reading], list[Reading]]:
        """(local readings under `masks`, global readings of the whole images)."""
        self.model.eval()
        images, masks = images.to(self.device), masks.to(self.device)
        loc = self.model(images, masks)
        glo = self.model(images, torch.ones_like(masks))
        return self.decode(*loc, whole=False), self.decode(*glo, whole=True)

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

def _loss(outputs, bg, count, first) -> torch.Tensor:
    bg_logits, count_logits, first_logits = outputs
    # counts: summed over groups (one mistake in one group is a wrong prompt), averaged over rows
    count_loss = F.cross_entropy(count_logits.flatten(0, 1), count.flatten(), reduction="sum") / count.shape[0]
    layer_loss = F.cross_entropy(first_logits.flatten(0, 1), first.flatten(), ignore_index=IGNORE) \
        if (first != IGNORE).any() else count_loss * 0
    return F.cross_entropy(bg_logits, bg) + count_loss + layer_loss


def train(rows: list[dict], cfg: PseudoLabellerConfig, data: DataConfig, seed: int,
          progress: bool = True) -> tuple[PseudoLabeller, dict]:
    """Train on annotated rows (image, mask, objects, background, object_index, instances); seeded."""
    from pipeline.runtime import resolve_device

    if not rows:
        raise ValueError("pseudo-labeller: no labelled rows to train on")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = resolve_device(cfg.device)
    vocab = Vocab.from_data(data)
    images, masks = read_inputs(rows, cfg.image_size)
    t = labelled_targets(rows, vocab)
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
            img, msk = images[idx], masks[idx]
            # horizontal flips: every shape is left-right symmetric, so the targets stay the same
            flip = torch.rand(len(idx), generator=gen) < 0.5
            img = torch.where(flip[:, None, None, None], img.flip(-1), img)
            msk = torch.where(flip[:, None, None, None], msk.flip(-1), msk)
            # each row read twice: under its mask (local prompt) and whole (global prompt)
            x = torch.cat([img, img]).to(device)
            m = torch.cat([msk, torch.ones_like(msk)]).to(device)
            bg = torch.cat([t["bg"][idx], t["bg"][idx]]).to(device)
            count = torch.cat([t["count"][idx], t["g_count"][idx]]).to(device)
            first = torch.cat([t["first"][idx], t["g_first"][idx]]).to(device)
            loss = _loss(model(x, m), bg, count, first)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return pl, {"rows": len(rows), "steps": total, "final_loss": float(loss.item()),
                "seconds": round(time.perf_counter() - t0, 2)}


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
