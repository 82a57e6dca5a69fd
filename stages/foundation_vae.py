"""DVC stage `foundation_vae`: train the tiny world's VAE -> models/vae, metrics/foundation/vae.json.
With world.source: pretrained, resolve and check every pretrained model and link the VAE instead."""

import argparse

from pipeline import paths
from pipeline.config import load
from pipeline.foundation.vae import train_vae
from pipeline.metrics_io import write_json
from pipeline.models import pretrained


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    cfg = load(args.params)
    if pretrained.is_pretrained(cfg):
        metrics = pretrained.materialise(cfg, "vae", paths.FOUNDATION_VAE)
    else:
        metrics = train_vae(cfg, paths.SCENES, paths.FOUNDATION_VAE, paths.CHECKPOINTS / "vae", paths.DVCLIVE / "vae")
    write_json(paths.METRICS / "foundation" / "vae.json", metrics)
    print(metrics)


if __name__ == "__main__":
    main()
