"""DVC stage `validate_captions`: Great Expectations gate on data/captions/captions.parquet."""

import sys

from pipeline import paths
from pipeline.validation.cli import gate_main
from pipeline.validation.gates import captions_gate


def _args(ap):
    ap.add_argument("--captions", default=str(paths.CAPTIONS / "captions.parquet"))
    ap.add_argument("--manifest", default=str(paths.TRIPLETS / "manifest.parquet"))


def main(argv=None) -> int:
    return gate_main("captions", _args, lambda a, cfg, g: captions_gate(a.captions, a.manifest, g, a.out_dir), argv)


if __name__ == "__main__":
    sys.exit(main())
