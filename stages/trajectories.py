"""DVC stage `trajectories`: the teacher samples every unlabelled row from noise (pseudo local prompt,
masked image) and keeps points of its trajectory for stage 2 with ``distill.stage2.noisy: teacher``
(pipeline/distill/trajectories.py). -> data/trajectories, metrics/trajectories.json
"""

import sys

from pipeline import distributed, paths
from pipeline.data.encode import joined
from pipeline.distill.trajectories import SPLIT, write_trajectories
from pipeline.entry import stage
from pipeline.metrics_io import write_json
from pipeline.runtime import runtime
from pipeline.timing import stopwatch


@stage(__doc__, kind="model")
def main(args, cfg):
    rt = runtime(cfg)
    df = joined(paths.TRIPLETS, paths.CAPTIONS)
    with stopwatch(rt.device) as t:
        m = write_trajectories(cfg, rt.load_foundation(paths.BACKBONE), rt.load_controlnet(paths.TEACHER),
                               df[df["split"] == SPLIT], paths.TRAJECTORIES)
    if distributed.world().main:  # launched on several processes, rank 0 alone writes the outputs
        write_json(paths.TRAJECTORY_METRICS, {**m, "seconds": t.seconds})
    print(m)


if __name__ == "__main__":
    sys.exit(main())
