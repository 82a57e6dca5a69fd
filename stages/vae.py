"""DVC stage `vae`: train the tiny world's VAE -> models/vae, metrics/foundation/vae.json.
With world.source: pretrained, resolve and check every pretrained model and link the VAE instead."""

import sys

from pipeline import paths
from pipeline.foundation.component import foundation_stage
from pipeline.foundation.vae import train_vae

main = foundation_stage(__doc__, "vae", paths.VAE, lambda cfg, checkpoints, live: train_vae(
    cfg, paths.SCENES, paths.VAE, checkpoints, live))


if __name__ == "__main__":
    sys.exit(main())
