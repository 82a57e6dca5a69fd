"""DVC stage `caption`: data/triplets (+ models/pseudo_labeller for the unlabelled split) ->
data/captions/captions.parquet (params: caption)."""

import argparse
import sys
from pathlib import Path

from pipeline import paths
from pipeline.captions.run import caption_manifest
from pipeline.config import ConfigError, load
from pipeline.data.triplets import parse_shard


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--manifest", default=str(paths.TRIPLETS / "manifest.parquet"))
    ap.add_argument("--out", default=str(paths.CAPTIONS / "captions.parquet"),
                    help="the captions file, or a folder to write captions.parquet into (what the flows' "
                         "sharded runs pass: --shard {shard} --out {out})")
    ap.add_argument("--shard", help="i/N: caption a deterministic subset (by id hash)")
    ap.add_argument("--backend", choices=["annotations", "caption_noise", "qwen2_5_vl"],
                    help="override caption.backend (every split but the unlabelled one)")
    ap.add_argument("--pseudo-labeller", default=str(paths.PSEUDO_LABELLER),
                    help="the model folder of caption.unlabelled_backend: pseudo_labeller")
    args = ap.parse_args(argv)
    try:
        cfg = load(args.params)
        ccfg = cfg.caption
        if args.backend:
            ccfg = ccfg.model_copy(update={"backend": args.backend})
        out = Path(args.out)
        if out.is_dir() or out.suffix != ".parquet":
            out = out / "captions.parquet"
        df = caption_manifest(args.manifest, ccfg, out, parse_shard(args.shard),
                                pseudo_labeller=args.pseudo_labeller)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"caption: {exc}", file=sys.stderr)
        return 2
    print(f"{out}: {len(df)} captions " + str(df["caption_source"].value_counts().to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
