"""DVC stage `teacher`: the 23-layer inpainting ControlNet on the frozen foundation -> models/teacher.
With world.source: pretrained, the checked alimama teacher is linked there instead of trained."""

from pipeline import paths
from pipeline.foundation.stage import run
from pipeline.foundation.teacher import train_teacher


def main(argv=None) -> None:
    run(__doc__, "teacher", paths.TEACHER, lambda cfg: train_teacher(
        cfg, paths.SCENES, paths.BACKBONE, paths.TEACHER, paths.CHECKPOINTS / "teacher", paths.DVCLIVE / "teacher"),
        argv)


if __name__ == "__main__":
    main()
