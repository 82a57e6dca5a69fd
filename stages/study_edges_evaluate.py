"""studies/dvc.yaml stage `edges_evaluate`: the edges teacher and the backbone alone on the whole test split
under condition edges, as the main `evaluate` stage evaluates the inpainting models; the teacher's outputs
are kept (data/studies/edges/eval_teacher) as the edges students' agreement reference.

    python -m stages.study_edges_evaluate
    # -> metrics/studies/edges/<model>.json, metrics/studies/per_image/edges/<model>.csv
    #    (model: teacher, backbone_only)
"""

import argparse

from pipeline import paths
from pipeline import studies as S
from pipeline.config import load
from pipeline.data.encode import joined
from pipeline.evaluation.evaluate import test_rows
from pipeline.metrics_io import write_csv, write_json
from pipeline.studies import config as study_config
from pipeline.studies.edges import evaluate_edges


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--studies", default=str(S.STUDY_PARAMS))
    args = ap.parse_args(argv)
    cfg = load(args.params)
    study_config.load(cfg, args.studies)  # validated against params.yaml
    df = test_rows(joined(paths.TRIPLETS, paths.CAPTIONS), cfg.evaluate.num_images)
    evals = evaluate_edges(cfg, df, foundation=paths.BACKBONE, teacher=S.EDGES_TEACHER, reference=S.EDGES_REFERENCE)
    for name, ev in evals.items():
        write_json(S.EDGES_METRICS / f"{name}.json", {**ev.summary, "condition": "edges"})
        write_csv(S.EDGES_PER_IMAGE / f"{name}.csv", ev.per_image)
        print(name, {k: round(v, 4) if isinstance(v, float) else v for k, v in ev.summary.items()
                     if k != "not_computed"})


if __name__ == "__main__":
    main()
