"""Stage 2's second reading of the paper (``distill.stage2.noisy: teacher``): the noisy inputs are points on
the teacher's own sampling trajectory, not noised images.

The `trajectories` stage runs the evaluation sampler (pipeline.evaluation.sampler, the stock inpainting
pipeline's conventions) with the teacher on every unlabelled row, from pure noise (row i: seed + i), given
the masked image and the row's pseudo local prompt, and keeps ``points_per_image`` of its intermediate
latents x_t with their timesteps t (steps drawn per row without replacement). Nothing of the hole's content
is read: the teacher sees what a user's unlabelled masked image gives it.

Written like the encoded shards (pipeline.data.shards): data/trajectories/unlabelled/shard-*.safetensors,
one row per point, id ``<row id>#p<k>``, tensors ``noisy`` (C, h, w) and ``timestep`` (); memory holds one
micro-batch (runtime.sample_batch_size). Disk: points_per_image x the size of the latents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pipeline import distributed
from pipeline.atomic import check_replaceable, write_dir
from pipeline.config import Config
from pipeline.data.images import read_images, read_masks
from pipeline.data.shards import EncodedSplit, concat_shards, write_shard_stream
from pipeline.evaluation.sampler import inpaint_images
from pipeline.models.mapping import TEACHER_CONVENTION

SPLIT = "unlabelled"
KEYS = ("noisy", "timestep")


def point_id(row_id: str, k: int) -> str:
    return f"{row_id}#p{k}"


def row_of(point: str) -> str:
    return point.rsplit("#p", 1)[0]


def chosen_steps(cfg: Config, position: int) -> list[int]:
    """The sampler steps whose latents row ``position`` keeps (sorted, distinct, seeded by the row)."""
    tc = cfg.trajectories
    if tc.points_per_image > tc.num_inference_steps:
        raise ValueError(f"trajectories.points_per_image: {tc.points_per_image} points from "
                         f"{tc.num_inference_steps} sampler steps (trajectories.num_inference_steps)")
    rng = np.random.default_rng([tc.seed, position])
    return sorted(int(s) for s in rng.choice(tc.num_inference_steps, tc.points_per_image, replace=False))


@torch.no_grad()
def write_trajectories(cfg: Config, pipe, teacher, rows: pd.DataFrame, out: Path, progress: bool = True) -> dict:
    """Sample ``rows`` (the unlabelled split with pseudo prompts, ordered by id) with the teacher and write
    the kept points to ``out``. Returns counts for the metrics.

    Launched on several processes (pipeline.distributed), each samples a contiguous run of the micro-batches
    (row i keeps its seed + i and its steps) into its part; rank 0 concatenates them into the file one
    process writes."""
    tc, step = cfg.trajectories, cfg.runtime.sample_batch_size
    rows = rows.sort_values("id", kind="stable").reset_index(drop=True)
    w = distributed.connect(pipe.transformer.device)
    mine = w.rows(len(rows), step)
    steps = [chosen_steps(cfg, i) for i in range(len(rows))]
    ids = [point_id(r, k) for r in rows["id"].iloc[mine] for k in range(tc.points_per_image)]

    def batches():
        for i in tqdm(range(mine.start, mine.stop, step), desc="teacher trajectories", disable=not progress):
            chunk = rows.iloc[i:i + step]
            images = read_images(chunk["image"], cfg.data.image_size)
            masks = read_masks(chunk["mask"], cfg.data.image_size)
            kept: dict[int, list] = {j: [] for j in range(len(chunk))}

            def keep(s, t, latents):
                for j in range(len(chunk)):
                    if s in steps[i + j]:
                        kept[j].append((latents[j].float().cpu(), float(t)))

            inpaint_images(pipe, teacher, TEACHER_CONVENTION, images, masks, list(chunk["local_prompt"]),
                           seeds=[tc.seed + i + j for j in range(len(chunk))],
                           num_inference_steps=tc.num_inference_steps, guidance_scale=tc.guidance_scale,
                           conditioning_scale=tc.conditioning_scale,
                           max_sequence_length=cfg.text.max_sequence_length, on_step=keep,
                           condition=cfg.condition)
            points = [p for j in range(len(chunk)) for p in kept[j]]
            yield {"noisy": torch.stack([x for x, _ in points]),
                   "timestep": torch.tensor([t for _, t in points], dtype=torch.float32)}

    with distributed.parts("trajectories", w) as job:
        if job is None:
            with write_dir(out) as tmp:
                write_shard_stream(tmp / SPLIT, 0, 1, ids, batches())
        else:
            check_replaceable(out)  # every rank: a wrong output path fails before the sampling
            if ids:
                write_shard_stream(job.mine / SPLIT, 0, 1, ids, batches())
            if (dirs := job.gather()) is not None:
                with write_dir(out) as tmp:
                    if concat_shards([d / SPLIT for d in dirs], tmp / SPLIT, 0, 1) is None:
                        raise ValueError(f"{out}: no rows to sample")
    return {"rows": len(rows), "points": len(rows) * tc.points_per_image, "points_per_image": tc.points_per_image,
            "num_inference_steps": tc.num_inference_steps}


class TrajectoryData:
    """Stage-2 training data for ``noisy: teacher``: one item per trajectory point, its control and prompt
    embeddings gathered from the encoded unlabelled row it came from (pipeline.training.Data protocol)."""

    def __init__(self, trajectories: Path, encoded: EncodedSplit):
        self.points = EncodedSplit(trajectories, SPLIT, KEYS)
        self.encoded = encoded
        position = {rid: i for i, rid in enumerate(encoded.ids)}
        missing = [p for p in self.points.ids if row_of(p) not in position]
        if missing:
            raise ValueError(f"{trajectories}: points of rows the encoded unlabelled split lacks, e.g. "
                             f"{missing[:3]} (rerun the trajectories stage)")
        self.rows = torch.tensor([position[row_of(p)] for p in self.points.ids])

    def __len__(self) -> int:
        return len(self.points)

    def gather(self, idx) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        return {**self.encoded.gather(self.rows[idx]), **self.points.gather(idx)}

    def digest(self) -> str:
        return self.points.digest() + self.encoded.digest()
