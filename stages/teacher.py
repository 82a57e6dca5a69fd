"""DVC stage `teacher`: the 23-layer inpainting ControlNet on the frozen foundation -> models/teacher.
With world.source: pretrained, the checked alimama teacher is linked there instead of trained."""

import sys

from pipeline import paths
from pipeline.foundation.component import foundation_stage
from pipeline.foundation.teacher import train_teacher

main = foundation_stage(__doc__, "teacher", paths.TEACHER, lambda cfg, checkpoints, live: train_teacher(
    cfg, paths.SCENES, paths.BACKBONE, paths.TEACHER, checkpoints, live))


if __name__ == "__main__":
    sys.exit(main())
