"""DVC stage `trajectories`: the teacher samples every unlabelled row from noise (pseudo local prompt,
masked image) and keeps points of its trajectory for stage 2 with ``distill.stage2.noisy: teacher``
(pipeline/distill/trajectories.py). -> data/trajectories, metrics/trajectories.json
"""

import argparse

from pipeline import paths
from pipeline.config import load
from pipeline.data.encode import joined
from pipeline.distill.trajectories import SPLIT, write_trajectories
from pipeline.metrics_io import write_json
from pipeline.runtime import runtime
from pipeline.timing import stopwatch


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    cfg = load(ap.parse_args(argv).params)
    rt = runtime(cfg)
    df = joined(paths.TRIPLETS, paths.CAPTIONS)
    with stopwatch(rt.device) as t:
        m = write_trajectories(cfg, rt.load_foundation(paths.BACKBONE), rt.load_controlnet(paths.TEACHER),
                               df[df["split"] == SPLIT], paths.TRAJECTORIES)
    write_json(paths.TRAJECTORY_METRICS, {**m, "seconds": t.seconds})
    print(m)


if __name__ == "__main__":
    main()
