"""studies/dvc.yaml matrix stage `edges_student`: one edges student (condition edges, distill.student_layers
layers, the tri-level loss, both stages, headline budget) distilled from the edges teacher at SEED and
evaluated on the whole test split against the edges teacher's outputs (pipeline/studies/edges.py).

    python -m stages.study_edges_student SEED
    # -> models/studies/edges/student-sSEED, metrics/studies/edges/student-sSEED.json,
    #    metrics/studies/per_image/edges/student-sSEED.csv
"""

import argparse

from pipeline import paths
from pipeline import studies as S
from pipeline.config import load
from pipeline.data.encode import joined
from pipeline.evaluation.evaluate import test_rows
from pipeline.metrics_io import write_csv, write_json
from pipeline.studies import config as study_config
from pipeline.studies.edges import run_student, student_name


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("seed", type=int)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--studies", default=str(S.STUDY_PARAMS))
    args = ap.parse_args(argv)
    cfg = load(args.params)
    study_config.load(cfg, args.studies)  # validated against params.yaml
    name = student_name(args.seed)
    df = test_rows(joined(paths.TRIPLETS, paths.CAPTIONS), cfg.evaluate.num_images)
    m, ev = run_student(cfg, args.seed, foundation=paths.BACKBONE, teacher=S.EDGES_TEACHER, encoded=S.EDGES_ENCODED,
                        reference=S.EDGES_REFERENCE, df=df, out_dir=S.EDGES_MODELS / name,
                        work_dir=S.EDGES_CHECKPOINTS / name)
    write_csv(S.EDGES_PER_IMAGE / f"{name}.csv", ev.per_image)
    write_json(S.EDGES_METRICS / f"{name}.json", m)
    print(name, {k: v for k, v in m.items() if k != "not_computed"})


if __name__ == "__main__":
    main()
