"""DVC stage `teacher`: the 23-layer inpainting ControlNet on the frozen foundation -> models/teacher."""

import argparse

from pipeline import paths
from pipeline.config import load
from pipeline.foundation.teacher import train_teacher
from pipeline.metrics_io import write_json


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    cfg = load(ap.parse_args(argv).params)
    m = train_teacher(cfg, paths.SCENES, paths.FOUNDATION, paths.TEACHER, paths.CHECKPOINTS / "teacher",
                      paths.DVCLIVE / "teacher")
    write_json(paths.METRICS / "foundation" / "teacher.json", m)
    print(m)


if __name__ == "__main__":
    main()
