"""DVC stage `vae`: train the tiny world's VAE -> models/vae, metrics/foundation/vae.json.
With world.source: pretrained, resolve and check every pretrained model and link the VAE instead."""

from pipeline import paths
from pipeline.foundation.stage import run
from pipeline.foundation.vae import train_vae


def main(argv=None) -> None:
    run(__doc__, "vae", paths.VAE, lambda cfg: train_vae(
        cfg, paths.SCENES, paths.VAE, paths.CHECKPOINTS / "vae", paths.DVCLIVE / "vae"), argv)


if __name__ == "__main__":
    main()
