"""studies/dvc.yaml matrix stage `prompt_encode`: the unlabelled split as stage 2 reads it, with the local prompts
of one quality level embedded anew (pipeline/studies/prompt_quality.py).

    python -m stages.study_prompt_encode LEVEL     # noise<P> | empty
    # -> data/studies/prompt_quality/LEVEL/unlabelled, metrics/studies/prompt_quality/encode-LEVEL.json
"""

import argparse

from pipeline import paths
from pipeline import studies as S
from pipeline.config import load
from pipeline.metrics_io import write_json
from pipeline.studies import config as study_config
from pipeline.studies.prompt_quality import encode_level


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("level", type=lambda s: (study_config.prompt_level(s), s)[1])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--studies", default=str(S.STUDY_PARAMS))
    args = ap.parse_args(argv)
    cfg = load(args.params)
    study_config.load(cfg, args.studies)
    m = encode_level(cfg, args.level, foundation=paths.BACKBONE, encoded=paths.ENCODED, captions=paths.CAPTIONS,
                     out=S.PROMPT_ENCODED / args.level)
    write_json(S.PROMPT_RUNS / f"encode-{args.level}.json", m)
    print(m)


if __name__ == "__main__":
    main()
