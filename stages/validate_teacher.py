"""DVC stage `validate_teacher`: teacher vs backbone-alone inpainting on the test split; fails when the
teacher does not clearly beat the baseline (the world would be too weak to distil from).
Writes metrics/gates/teacher.json and, only when it passes, metrics/gates/teacher.passed."""

import sys

from pipeline import paths
from pipeline.entry import CheckFailed, stage
from pipeline.metrics_io import write_json
from pipeline.validation.teacher_gate import teacher_gate


@stage(__doc__, kind="serial")
def main(args, cfg):
    m = teacher_gate(cfg, paths.SCENES, paths.BACKBONE, paths.TEACHER)
    write_json(paths.GATES / "teacher.json", m)
    print(m)
    paths.TEACHER_PASSED.unlink(missing_ok=True)
    if not m["passed"]:
        raise CheckFailed(
            f"the teacher gains {m['teacher_gain_psnr_db']:.2f} dB whole-image PSNR over the backbone alone "
            f"(needs >= {m['required_gain_db']}) and masked PSNR {m['teacher_psnr_masked']:.2f} vs "
            f"{m['backbone_only_psnr_masked']:.2f}: the tiny world is too weak to distil from")
    # What distillation depends on: the verdict, not the figures (which move in the last digits).
    paths.TEACHER_PASSED.write_text("the teacher passed its gate; figures in teacher.json\n")


if __name__ == "__main__":
    sys.exit(main())
