"""DVC stage `validate_encoded`: Great Expectations gate on data/encoded/<split>/shard-*.safetensors."""

import sys

from pipeline import paths
from pipeline.entry import arg
from pipeline.validation.cli import gate
from pipeline.validation.gates import encoded_gate


@gate("encoded", __doc__, arg("--encoded", default=str(paths.ENCODED)),
      arg("--manifest", default=str(paths.TRIPLETS / "manifest.parquet")))
def main(args, cfg):
    return encoded_gate(args.encoded, args.manifest, cfg.gates, args.out_dir, condition=cfg.condition)


if __name__ == "__main__":
    sys.exit(main())
