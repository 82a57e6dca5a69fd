"""DVC stage `pseudo_labeller`: data/triplets (labelled split) -> models/pseudo_labeller, metrics/pseudo_labeller.json
(params: seed, data vocabulary, caption.unlabelled_backend, caption.pseudo_labeller).

Trains the model that captions the unlabelled split (pipeline/captions/pseudo_labeller.py) and evaluates it on
val; exit 1 when val local exact match is under caption.pseudo_labeller.min_exact_match. When
caption.unlabelled_backend is not pseudo_labeller it writes a README-only folder and {"used": false}.
"""

import json
import sys

from pipeline import paths
from pipeline.entry import CheckFailed, arg, stage


@stage(__doc__, arg("--manifest", default=str(paths.TRIPLETS / "manifest.parquet")),
       arg("--out", default=str(paths.PSEUDO_LABELLER)), arg("--metrics", default=str(paths.PSEUDO_LABELLER_METRICS)),
       kind="serial")
def main(args, cfg):
    from pipeline.captions.pseudo_labeller import BelowThreshold, build  # torch: after params.yaml validates

    try:
        metrics = build(cfg, args.manifest, args.out, args.metrics)
    except BelowThreshold as exc:
        raise CheckFailed(str(exc)) from exc
    summary = {k: metrics["val"][k] for k in ("local_exact_match", "global_exact_match")} if metrics["used"] \
        else {"used": False}
    print(f"{args.out}: {json.dumps(summary)}")


if __name__ == "__main__":
    sys.exit(main())
