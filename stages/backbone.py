"""DVC stage `backbone`: tokenizer, CLIP encoders and the 24-block backbone -> models/backbone
(an SD3 pipeline folder with the VAE from models/vae). With world.source: pretrained, the checked
SD3-medium pipeline folder (T5 included) is linked there instead."""

from pipeline import paths
from pipeline.foundation.backbone import train_backbone
from pipeline.foundation.stage import run


def main(argv=None) -> None:
    run(__doc__, "backbone", paths.BACKBONE, lambda cfg: train_backbone(
        cfg, paths.SCENES, paths.VAE, paths.BACKBONE, paths.CHECKPOINTS / "backbone",
        paths.DVCLIVE / "backbone"), argv)


if __name__ == "__main__":
    main()
