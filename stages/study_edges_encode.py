"""studies/dvc.yaml stage `edges_encode`: the splits distillation reads (labelled, unlabelled) encoded under
condition edges (the edge map's latents as control, no mask) -> data/studies/edges/encoded/<split>/ shards
(pipeline/studies/edges.py).

    python -m stages.study_edges_encode
"""

import argparse

from pipeline import paths
from pipeline import studies as S
from pipeline.config import load
from pipeline.data.encode import joined
from pipeline.studies import config as study_config
from pipeline.studies.edges import encode_edges


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--studies", default=str(S.STUDY_PARAMS))
    args = ap.parse_args(argv)
    cfg = load(args.params)
    study_config.load(cfg, args.studies)  # validated against params.yaml
    counts = encode_edges(cfg, joined(paths.TRIPLETS, paths.CAPTIONS), foundation=paths.BACKBONE,
                          out=S.EDGES_ENCODED)
    print(f"edges encoded: {counts}")


if __name__ == "__main__":
    main()
