"""Where each stage reads and writes, relative to the workspace root: the one home of every path.

dvc.yaml is generated from these (pipeline/dvcgen.py), so a stage's deps and outs cannot disagree with
what its code opens.
"""

from pathlib import Path

DATA = Path("data")
SCENES = DATA / "scenes"                 # synthetic generator: PNG shards (shards/*.parquet) + manifest.parquet
TRIPLETS = DATA / "triplets"             # build_triplets: manifest.parquet + PNG shards (shards/*.parquet)
CAPTIONS = DATA / "captions"             # caption: captions.parquet
CAPTION_CACHE = DATA / "caption_cache"   # caption: the VLM's resumable cache (caption.qwen.cache_dir)
ENCODED = DATA / "encoded"               # encode: <split>/shard-*.safetensors
TRAJECTORIES = DATA / "trajectories"     # trajectories: the teacher's sampling points on the unlabelled split
EVAL_REFERENCE = DATA / "eval" / "teacher"  # evaluate: the teacher's test outputs (<id>.png), agreement reference
MODELS = Path("models")
VAE = MODELS / "vae"
BACKBONE = MODELS / "backbone"           # the frozen SD3 pipeline folder (model_index.json): backbone, VAE, text
TEACHER = MODELS / "teacher"
PSEUDO_LABELLER = MODELS / "pseudo_labeller"  # pseudo_labeller: captions the unlabelled split (caption.unlabelled_backend)
STUDENT_STAGE1 = MODELS / "student_stage1"
STUDENT = MODELS / "student"
ABLATIONS = MODELS / "ablations"         # <variant>-s<seed>
CHECKPOINTS = Path("checkpoints")
ABLATION_STAGE1 = CHECKPOINTS / "ablations"  # stage1-s<seed>: full's stage-1 checkpoint (ablate_stage1), the runs' prefix
DVCLIVE = Path("dvclive")
REPORTS = Path("reports")
SAMPLES = REPORTS / "samples"
FIGURES = REPORTS / "figures"
REPORT = REPORTS / "report.md"
FRONTIER = REPORTS / "frontier.csv"
RUN_TIME = REPORTS / "run_time.json"      # `make run`: wall time and stage times (git); the next run's stage order

METRICS = Path("metrics")                # small JSON metric files, tracked by git (cache: false)
GATES = METRICS / "gates"                # <gate>.json + <gate>.md per validate_* stage
TEACHER_PASSED = GATES / "teacher.passed"  # exists only when the teacher gate passed: distillation waits on it
FOUNDATION_METRICS = METRICS / "foundation"  # vae.json, backbone.json, teacher.json
DISTILL_METRICS = METRICS / "distill"    # stage1.json, stage2.json
EVAL_METRICS = METRICS / "eval"          # <model>.json
ABLATION_METRICS = METRICS / "ablations"  # <variant>-s<seed>.json
PER_IMAGE = METRICS / "per_image"        # <model or run>.csv: per test image metrics (paired statistics)
STUDY_METRICS = METRICS / "study.json"   # report: the ablation study's paired differences and verdicts
TRIPLETS_METRICS = METRICS / "triplets.json"
PSEUDO_LABELLER_METRICS = METRICS / "pseudo_labeller.json"
ENCODE_METRICS = METRICS / "encode.json"
TRAJECTORY_METRICS = METRICS / "trajectories.json"
ENCODE_BENCHMARK_METRICS = METRICS / "encode_benchmark.json"
MEMORY_BENCHMARK_METRICS = METRICS / "memory_benchmark.json"
STEP_BENCHMARK_METRICS = METRICS / "step_benchmark.json"
BENCHMARK_METRICS = METRICS / "benchmark.json"
REPORT_METRICS = METRICS / "report.json"
HEADLINE_METRICS = METRICS / "headline.json"     # the only DVC metrics file: what `dvc exp show` lists
