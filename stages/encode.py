"""DVC stage `encode`: VAE latents and prompt embeddings of every triplet -> data/encoded/<split>/ shards."""

import shutil
import sys

from pipeline import distributed, paths
from pipeline.data.encode import encode_dataset, joined
from pipeline.data.triplets import parse_shard
from pipeline.entry import arg, stage
from pipeline.metrics_io import write_json
from pipeline.runtime import runtime


@stage(__doc__, arg("--out", default=str(paths.ENCODED)),
       arg("--shard", default="0/1", help="i/N: encode the i-th of N deterministic subsets"), kind="model")
def main(args, cfg):
    i, n = parse_shard(args.shard)
    main_rank = distributed.world().main  # launched on several processes, rank 0 alone writes the outputs
    if n == 1 and main_rank:
        shutil.rmtree(args.out, ignore_errors=True)  # a full run replaces every shard
    rt = runtime(cfg)
    pipe = rt.load_foundation(paths.BACKBONE)
    df = joined(paths.TRIPLETS, paths.CAPTIONS)
    counts = encode_dataset(pipe, df, args.out, cfg.data.image_size, cfg.text.max_sequence_length, (i, n),
                            batch=rt.encode_batch_size, condition=cfg.condition)
    if i == 0 and main_rank:
        # the rows of the whole dataset, as an unsharded run writes them (the union of the N shards holds
        # exactly these; validate_encoded checks it). One shard writes it, so parallel shards never race.
        write_json(paths.ENCODE_METRICS,
                   {"rows": {str(k): int(v) for k, v in df.groupby("split").size().items()}})
    print(f"shard {i}/{n}: {counts}")


if __name__ == "__main__":
    sys.exit(main())
