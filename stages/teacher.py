"""DVC stage `teacher`: the 23-layer inpainting ControlNet on the frozen foundation -> models/teacher.
With world.source: pretrained, the checked alimama teacher is linked there instead of trained."""

import argparse

from pipeline import paths
from pipeline.config import load
from pipeline.foundation.teacher import train_teacher
from pipeline.metrics_io import write_json
from pipeline.models import pretrained


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    cfg = load(ap.parse_args(argv).params)
    if pretrained.is_pretrained(cfg):
        m = pretrained.materialise(cfg, "teacher", paths.TEACHER)
    else:
        m = train_teacher(cfg, paths.SCENES, paths.FOUNDATION, paths.TEACHER, paths.CHECKPOINTS / "teacher",
                          paths.DVCLIVE / "teacher")
    write_json(paths.METRICS / "foundation" / "teacher.json", m)
    print(m)


if __name__ == "__main__":
    main()
