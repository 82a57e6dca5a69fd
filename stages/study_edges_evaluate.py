"""studies/dvc.yaml stage `edges_evaluate`: the edges teacher and the backbone alone on the whole test split
under condition edges, as the main `evaluate` stage evaluates the inpainting models; the teacher's outputs
are kept (data/studies/edges/eval_teacher) as the edges students' agreement reference.

    python -m stages.study_edges_evaluate
    # -> metrics/studies/edges/<model>.json, metrics/studies/per_image/edges/<model>.csv
    #    (model: teacher, backbone_only)
"""

import sys

from pipeline import paths
from pipeline import studies as S
from pipeline.stage_io import evaluation_rows, write_evaluations
from pipeline.studies.edges import evaluate_edges
from pipeline.study_stage import study_stage


@study_stage(__doc__, kind="model")
def main(args, cfg, study):
    evals = evaluate_edges(cfg, evaluation_rows(cfg), foundation=paths.BACKBONE, teacher=S.EDGES_TEACHER,
                           reference=S.EDGES_REFERENCE)
    if evals is not None:  # None: a rank other than 0 of a launched run (rank 0 merged the rows and writes)
        write_evaluations(evals, S.EDGES_METRICS, S.EDGES_PER_IMAGE, condition="edges")


if __name__ == "__main__":
    sys.exit(main())
