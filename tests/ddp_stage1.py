"""Stage-1 distillation of the micro world on several CPU processes (gloo), for
tests/test_distill.py::test_two_processes_train_as_one:

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.ddp_stage1 WORLD_ROOT OUT

(`accelerate launch --cpu --num_processes 2` starts one process on this machine.) Every rank writes
OUT/rank<i>.json (what its Accelerator saw, and where the launcher put it: its node rank, local rank and
launcher process, for tests/test_two_machines.py) and OUT/rank<i>.safetensors (its final weights).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from pipeline.config import load
from pipeline.distill import trainer


def main(root: Path, out: Path) -> None:
    seen = {}

    class Recording(trainer.Loop):
        def run(self):
            place = self.on_start

            def capture(acc):
                seen["acc"] = acc
                place(acc)

            self.on_start = capture
            seen["loop"] = self
            return super().run()

    trainer.Loop = Recording
    cfg = load(root / "params.yaml")
    metrics = trainer.distill(cfg, "stage1", foundation=root / "models/foundation", teacher=root / "models/teacher",
                              encoded=root / "data/encoded", out=out / "student", checkpoints=out / "ck", live=None)
    acc, model = seen["acc"], seen["loop"].model
    assert acc.num_processes == 2, f"expected 2 processes, got {acc.num_processes} ({acc.distributed_type})"
    rank = acc.process_index
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({
        "num_processes": acc.num_processes, "distributed_type": acc.distributed_type.value, "metrics": metrics,
        "frozen": [k for k, p in model.named_parameters() if not p.requires_grad], **placement()}))


def placement() -> dict:
    """Where torchrun put this process: its node rank (GROUP_RANK), local rank, and the launcher (parent)."""
    return {"node_rank": int(os.environ["GROUP_RANK"]), "local_rank": int(os.environ["LOCAL_RANK"]),
            "launcher_pid": os.getppid()}


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
