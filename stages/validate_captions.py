"""DVC stage `validate_captions`: Great Expectations gate on data/captions/captions.parquet."""

import sys

from pipeline import paths
from pipeline.entry import arg
from pipeline.validation.cli import gate
from pipeline.validation.gates import captions_gate


@gate("captions", __doc__, arg("--captions", default=str(paths.CAPTIONS / "captions.parquet")),
      arg("--manifest", default=str(paths.TRIPLETS / "manifest.parquet")))
def main(args, cfg):
    return captions_gate(args.captions, args.manifest, cfg.gates, args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
