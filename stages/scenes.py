"""DVC stage `scenes`: render the synthetic scenes into data/scenes (params: seed, data)."""

import sys

from pipeline import paths
from pipeline.data.synthetic import generate_scenes
from pipeline.entry import arg, stage


@stage(__doc__, arg("--out", default=str(paths.SCENES)))
def main(args, cfg):
    df = generate_scenes(cfg.data, cfg.seed, args.out)
    print(f"{args.out}: {len(df)} scenes " + str(df.groupby("split").size().to_dict()))


if __name__ == "__main__":
    sys.exit(main())
