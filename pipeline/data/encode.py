"""The encode stage: triplets + captions -> safetensors shards of latents and prompt embeddings, so that
training never runs the VAE or the text encoders per step (pipeline.data.shards has the format).

Memory is one micro-batch (runtime.encode_batch_size rows: their PNGs, activations and tensors), whatever
the split's size: each micro-batch is encoded on the models' device and written into its shard at once."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from pipeline import distributed
from pipeline.data.images import load_manifest, read_images, read_masks
from pipeline.data.shards import concat_shards, write_shard_stream
from pipeline.models import condition as conditions
from pipeline.models import inpaint
from pipeline.models.world import encode_prompts


def shard_rows(df: pd.DataFrame, index: int, count: int) -> pd.DataFrame:
    """Deterministic subset ``index`` of ``count``: rows ordered by id, every count-th one."""
    if not 0 <= index < count:
        raise ValueError(f"--shard: index {index} is out of range for {count} shards")
    return df.sort_values("id").iloc[index::count]


def joined(triplets_dir: Path, captions_dir: Path) -> pd.DataFrame:
    trip = load_manifest(Path(triplets_dir) / "manifest.parquet")
    caps = pd.read_parquet(Path(captions_dir) / "captions.parquet")[["id", "local_prompt", "global_prompt"]]
    df = trip.drop(columns=[c for c in ("local_prompt", "global_prompt") if c in trip]).merge(caps, on="id", how="left")
    missing = df[df["local_prompt"].isna() | df["global_prompt"].isna()]
    if len(missing):
        raise ValueError(f"{captions_dir}/captions.parquet: no caption for ids {list(missing['id'][:5])}"
                         f" ({len(missing)} rows)")
    return df


@torch.no_grad()
def encode_rows(pipe, df: pd.DataFrame, image_size: int, max_sequence_length: int,
                condition: str = "inpaint") -> dict[str, torch.Tensor]:
    """Read the rows' PNGs and encode them with the pipe's VAE and text encoders (on the pipe's device;
    the tensors come back there). The control's tensors are ``condition``'s
    (pipeline.models.condition.encode_for_shards)."""
    device = pipe.vae.device
    images = read_images(df["image"], image_size).to(device)
    masks = read_masks(df["mask"], image_size).to(device)
    latents = inpaint.encode(pipe.vae, images)
    control = conditions.encode_for_shards(pipe.vae, images, masks, condition)
    pe, pp = encode_prompts(pipe, list(df["local_prompt"]), max_sequence_length, device)
    ge, gp = encode_prompts(pipe, list(df["global_prompt"]), max_sequence_length, device)
    return {"latents": latents, **control,
            "prompt_embeds": pe, "pooled_prompt_embeds": pp,
            "global_prompt_embeds": ge, "global_pooled_prompt_embeds": gp}


def encode_dataset(pipe, df: pd.DataFrame, out: Path, image_size: int, max_sequence_length: int,
                   shard: tuple[int, int] = (0, 1), batch: int = 256, condition: str = "inpaint") -> dict[str, int]:
    """Encode shard ``shard`` = (i, N) of every split, ``batch`` rows per model call (the stage passes
    runtime.encode_batch_size), each micro-batch written into the split's shard file as it comes. Returns
    the shard's rows per split.

    Launched on several processes (pipeline.distributed), each encodes a contiguous run of each split's
    micro-batches into its part; rank 0 concatenates the parts into the shard files one process writes
    (same names, same bytes), whatever the number of processes. ``--shard`` composes with it: the processes
    share the shard's rows."""
    index, count = shard
    w = distributed.connect(pipe.vae.device)
    counts = {}
    with distributed.parts("encode", w) as job:
        dest = Path(out) if job is None else job.mine
        for split, part in df.groupby("split"):
            rows = shard_rows(part, index, count)
            mine = rows.iloc[w.rows(len(rows), batch)]
            if len(mine):
                chunks = ({k: v.cpu() for k, v in encode_rows(pipe, mine.iloc[i:i + batch], image_size,
                                                                max_sequence_length, condition).items()}
                          for i in tqdm(range(0, len(mine), batch), desc=f"encode {split}", leave=False))
                write_shard_stream(dest / split, index, count, list(mine["id"]), chunks)
            counts[split] = len(rows)
        if job is not None and (dirs := job.gather()) is not None:
            for split in counts:
                concat_shards([d / split for d in dirs], Path(out) / split, index, count)
    return counts
