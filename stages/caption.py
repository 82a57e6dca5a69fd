"""DVC stage `caption`: data/triplets (+ models/pseudo_labeller for the unlabelled split) ->
data/captions/captions.parquet (params: caption)."""

import sys
from pathlib import Path

from pipeline import paths
from pipeline.captions.run import caption_manifest
from pipeline.data.triplets import parse_shard
from pipeline.entry import arg, stage


@stage(__doc__,
       arg("--manifest", default=str(paths.TRIPLETS / "manifest.parquet")),
       arg("--out", default=str(paths.CAPTIONS / "captions.parquet"),
           help="the captions file, or a folder to write captions.parquet into (what the flows' "
                "sharded runs pass: --shard {shard} --out {out})"),
       arg("--shard", help="i/N: caption a deterministic subset (by id hash)"),
       arg("--backend", choices=["annotations", "caption_noise", "qwen2_5_vl"],
           help="override caption.backend (every split but the unlabelled one)"),
       arg("--pseudo-labeller", default=str(paths.PSEUDO_LABELLER),
           help="the model folder of caption.unlabelled_backend: pseudo_labeller"),
       kind="model")
def main(args, cfg):
    ccfg = cfg.caption
    if args.backend:
        ccfg = ccfg.model_copy(update={"backend": args.backend})
    out = Path(args.out)
    if out.is_dir() or out.suffix != ".parquet":
        out = out / "captions.parquet"
    df = caption_manifest(args.manifest, ccfg, out, parse_shard(args.shard), pseudo_labeller=args.pseudo_labeller)
    if df is not None:  # None: a rank other than 0 of a launched run (rank 0 wrote the captions)
        print(f"{out}: {len(df)} captions " + str(df["caption_source"].value_counts().to_dict()))


if __name__ == "__main__":
    sys.exit(main())
