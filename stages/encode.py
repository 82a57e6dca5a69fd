"""DVC stage `encode`: VAE latents and prompt embeddings of every triplet -> data/encoded/<split>/ shards."""

import argparse
import shutil

from pipeline import paths
from pipeline.config import load
from pipeline.data.encode import encode_dataset, joined
from pipeline.metrics_io import write_json
from pipeline.models.world import load_foundation


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=str(paths.ENCODED))
    ap.add_argument("--shard", default="0/1", help="i/N: encode the i-th of N deterministic subsets")
    args = ap.parse_args(argv)
    cfg = load(args.params)
    i, n = (int(x) for x in args.shard.split("/"))
    if n == 1:
        shutil.rmtree(args.out, ignore_errors=True)  # a full run replaces every shard
    pipe = load_foundation(paths.FOUNDATION)
    counts = encode_dataset(pipe, joined(paths.TRIPLETS, paths.CAPTIONS), args.out, cfg.data.image_size,
                            cfg.text.max_sequence_length, (i, n))
    if n == 1:
        write_json(paths.METRICS / "encode.json", {"rows": counts})
    print(counts)


if __name__ == "__main__":
    main()
