"""studies/dvc.yaml stage `edges_teacher`: the edges study's own teacher (params' teacher section, condition
edges: the scene's Sobel edge map as control image) trained on the world split (pipeline/studies/edges.py).

    python -m stages.study_edges_teacher
    # -> models/studies/edges/teacher, metrics/studies/edges/teacher_train.json
"""

import sys

from pipeline import distributed, paths
from pipeline import studies as S
from pipeline.metrics_io import write_json
from pipeline.studies.edges import train_edges_teacher
from pipeline.study_stage import study_stage

LIVE = paths.DVCLIVE / "studies" / "edges_teacher"


@study_stage(__doc__, kind="model")
def main(args, cfg, study):
    m = train_edges_teacher(cfg, scenes=paths.SCENES, foundation=paths.BACKBONE, out=S.EDGES_TEACHER,
                            checkpoints=S.EDGES_CHECKPOINTS / "teacher", live=LIVE)
    if distributed.world().main:  # launched on several processes, rank 0 alone writes the outputs
        write_json(S.EDGES_METRICS / "teacher_train.json", m)
        print(m)


if __name__ == "__main__":
    sys.exit(main())
