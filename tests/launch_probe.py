"""A stage module for tests/test_launch.py: the entry point's launcher at work without a model.

    PROBE_KIND=model python -m tests.launch_probe --params P --out DIR [--fail-rank R --code C]

Every process that runs the body writes DIR/<rank>.json (``none`` outside a launch): its pid, its parent's,
the launcher's variables and the device the runtime policy gives it; rank R exits with C (CheckFailed: 1,
ValueError: 2).
"""

import json
import os
import sys
from pathlib import Path

from pipeline.entry import CheckFailed, arg, stage

ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")


@stage(__doc__, arg("--out", required=True), arg("--fail-rank"), arg("--code", type=int, default=2),
       kind=os.environ.get("PROBE_KIND", "model"))
def main(args, cfg):
    from pipeline.runtime import resolve_device

    rank = os.environ.get("RANK", "none")
    record = {"pid": os.getpid(), "ppid": os.getppid(), "device": str(resolve_device(cfg.runtime.device)),
              **{k: os.environ.get(k) for k in ENV}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{rank}.json").write_text(json.dumps(record))
    if rank == args.fail_rank:
        raise (CheckFailed if args.code == 1 else ValueError)(f"rank {rank} failed on purpose")


if __name__ == "__main__":
    sys.exit(main())
