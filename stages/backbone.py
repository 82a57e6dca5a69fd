"""DVC stage `backbone`: tokenizer, CLIP encoders and the 24-block backbone -> models/backbone
(an SD3 pipeline folder with the VAE from models/vae). With world.source: pretrained, the checked
SD3-medium pipeline folder (T5 included) is linked there instead."""

import sys

from pipeline import paths
from pipeline.foundation.backbone import train_backbone
from pipeline.foundation.component import foundation_stage

main = foundation_stage(__doc__, "backbone", paths.BACKBONE, lambda cfg, checkpoints, live: train_backbone(
    cfg, paths.SCENES, paths.VAE, paths.BACKBONE, checkpoints, live))


if __name__ == "__main__":
    sys.exit(main())
