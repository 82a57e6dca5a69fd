"""DVC stage `foundation`: tokenizer, CLIP encoders and the 24-block backbone -> models/foundation
(an SD3 pipeline folder with the VAE from models/vae). With world.source: pretrained, the checked SD3-medium
pipeline folder (T5 included) is linked there instead."""

import argparse

from pipeline import paths
from pipeline.config import load
from pipeline.foundation.backbone import train_backbone
from pipeline.metrics_io import write_json
from pipeline.models import pretrained


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    cfg = load(ap.parse_args(argv).params)
    if pretrained.is_pretrained(cfg):
        m = pretrained.materialise(cfg, "foundation", paths.FOUNDATION)
    else:
        m = train_backbone(cfg, paths.SCENES, paths.FOUNDATION_VAE, paths.FOUNDATION, paths.CHECKPOINTS / "backbone",
                           paths.DVCLIVE / "backbone")
    write_json(paths.METRICS / "foundation" / "backbone.json", m)
    print(m)


if __name__ == "__main__":
    main()
