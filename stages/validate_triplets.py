"""DVC stage `validate_triplets`: Great Expectations gate on data/triplets/manifest.parquet."""

import sys

from pipeline import paths
from pipeline.entry import arg
from pipeline.validation.cli import gate
from pipeline.validation.gates import triplets_gate


@gate("triplets", __doc__, arg("--manifest", default=str(paths.TRIPLETS / "manifest.parquet")))
def main(args, cfg):
    return triplets_gate(args.manifest, cfg.gates, cfg.data.image_size, args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
