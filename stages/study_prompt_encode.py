"""studies/dvc.yaml matrix stage `prompt_encode`: the unlabelled split as stage 2 reads it, with the local prompts
of one quality level embedded anew (pipeline/studies/prompt_quality.py).

    python -m stages.study_prompt_encode LEVEL     # noise<P> | empty
    # -> data/studies/prompt_quality/LEVEL/unlabelled, metrics/studies/prompt_quality/encode-LEVEL.json
"""

import sys

from pipeline import paths
from pipeline import studies as S
from pipeline.entry import arg
from pipeline.metrics_io import write_json
from pipeline.studies.prompt_quality import encode_level
from pipeline.study_stage import prompt_level_name, study_stage


@study_stage(__doc__, arg("level", type=prompt_level_name), kind="serial")  # encode_level does not split its rows: one process
def main(args, cfg, study):
    m = encode_level(cfg, args.level, foundation=paths.BACKBONE, encoded=paths.ENCODED, captions=paths.CAPTIONS,
                     out=S.PROMPT_ENCODED / args.level)
    write_json(S.PROMPT_RUNS / f"encode-{args.level}.json", m)
    print(m)


if __name__ == "__main__":
    sys.exit(main())
