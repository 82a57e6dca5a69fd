"""The evaluate stage (``python -m stages.evaluate``, run in the workspace that is the cwd) in one rank of
a launch, recording what this rank did, for tests/test_two_machines.py:

    python -m torch.distributed.run --nnodes 2 --node_rank R ... -m tests.ddp_evaluate OUT

OUT/rank<i>.json: where torchrun put the rank (tests/ddp_stage1.py's placement) and, per model, the noise
seeds of the rows it sampled (``evaluate.seed`` + the row's index in the split: which rows it evaluated).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tests.ddp_stage1 import placement


def main(out: Path) -> int:
    from pipeline.evaluation import evaluate, sampler
    from stages import evaluate as stage

    sampled: dict[str, list[int]] = {}   # model -> the noise seeds of the rows it sampled here
    model = [None]
    evaluate_model, inpaint_images = evaluate.evaluate_model, sampler.inpaint_images

    def evaluating(cfg, pipe, name, *args, **kw):
        model[0] = name
        return evaluate_model(cfg, pipe, name, *args, **kw)

    def sampling(*args, seeds: list[int], **kw):
        sampled.setdefault(model[0], []).extend(seeds)
        return inpaint_images(*args, seeds=seeds, **kw)

    evaluate.evaluate_model = evaluating
    sampler.inpaint_images = evaluate.inpaint_images = sampling
    code = stage.main([])
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(
        {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"]), "exit": code,
         "seeds": sampled, **placement()}))
    return code


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
