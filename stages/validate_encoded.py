"""DVC stage `validate_encoded`: Great Expectations gate on data/encoded/<split>/shard-*.safetensors."""

import sys

from pipeline import paths
from pipeline.validation.cli import gate_main
from pipeline.validation.gates import encoded_gate


def _args(ap):
    ap.add_argument("--encoded", default=str(paths.ENCODED))
    ap.add_argument("--manifest", default=str(paths.TRIPLETS / "manifest.parquet"))


def main(argv=None) -> int:
    return gate_main("encoded", _args, lambda a, cfg, g: encoded_gate(a.encoded, a.manifest, g, a.out_dir,
                                                                   condition=cfg.condition), argv)


if __name__ == "__main__":
    sys.exit(main())
