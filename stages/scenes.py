"""DVC stage `scenes`: render the synthetic scenes into data/scenes (params: seed, data)."""

import argparse

from pipeline import paths
from pipeline.config import load
from pipeline.data.synthetic import generate_scenes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default=str(paths.SCENES))
    args = ap.parse_args(argv)
    cfg = load(args.params)
    df = generate_scenes(cfg.data, cfg.seed, args.out)
    print(f"{args.out}: {len(df)} scenes " + str(df.groupby("split").size().to_dict()))


if __name__ == "__main__":
    main()
