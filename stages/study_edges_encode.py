"""studies/dvc.yaml stage `edges_encode`: the splits distillation reads (labelled, unlabelled) encoded under
condition edges (the edge map's latents as control, no mask) -> data/studies/edges/encoded/<split>/ shards
(pipeline/studies/edges.py).

    python -m stages.study_edges_encode
"""

import sys

from pipeline import paths
from pipeline import studies as S
from pipeline.data.encode import joined
from pipeline.studies.edges import encode_edges
from pipeline.study_stage import study_stage


@study_stage(__doc__, kind="model")
def main(args, cfg, study):
    counts = encode_edges(cfg, joined(paths.TRIPLETS, paths.CAPTIONS), foundation=paths.BACKBONE,
                          out=S.EDGES_ENCODED)
    print(f"edges encoded: {counts}")


if __name__ == "__main__":
    sys.exit(main())
