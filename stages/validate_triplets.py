"""DVC stage `validate_triplets`: Great Expectations gate on data/triplets/manifest.parquet."""

import sys

from pipeline import paths
from pipeline.validation.cli import gate_main
from pipeline.validation.gates import triplets_gate


def main(argv=None) -> int:
    return gate_main(
        "triplets",
        lambda ap: ap.add_argument("--manifest", default=str(paths.TRIPLETS / "manifest.parquet")),
        lambda a, cfg, g: triplets_gate(a.manifest, g, cfg.data.image_size, a.out_dir), argv)


if __name__ == "__main__":
    sys.exit(main())
