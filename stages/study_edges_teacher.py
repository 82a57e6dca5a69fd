"""studies/dvc.yaml stage `edges_teacher`: the edges study's own teacher (params' teacher section, condition
edges: the scene's Sobel edge map as control image) trained on the world split (pipeline/studies/edges.py).

    python -m stages.study_edges_teacher
    # -> models/studies/edges/teacher, metrics/studies/edges/teacher_train.json
"""

import argparse

from pipeline import paths
from pipeline import studies as S
from pipeline.config import load
from pipeline.metrics_io import write_json
from pipeline.studies import config as study_config
from pipeline.studies.edges import train_edges_teacher

LIVE = paths.DVCLIVE / "studies" / "edges_teacher"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--studies", default=str(S.STUDY_PARAMS))
    args = ap.parse_args(argv)
    cfg = load(args.params)
    study_config.load(cfg, args.studies)  # validated against params.yaml
    m = train_edges_teacher(cfg, scenes=paths.SCENES, foundation=paths.BACKBONE, out=S.EDGES_TEACHER,
                            checkpoints=S.EDGES_CHECKPOINTS / "teacher", live=LIVE)
    write_json(S.EDGES_METRICS / "teacher_train.json", m)
    print(m)


if __name__ == "__main__":
    main()
