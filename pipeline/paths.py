"""Where each stage reads and writes, relative to the workspace root (dvc.yaml repeats these as deps/outs)."""

from pathlib import Path

DATA = Path("data")
SCENES = DATA / "scenes"                 # synthetic generator: PNGs + manifest.parquet
TRIPLETS = DATA / "triplets"             # build_triplets: manifest.parquet + files
CAPTIONS = DATA / "captions"             # caption: captions.parquet
ENCODED = DATA / "encoded"               # encode: <split>/shard-*.safetensors
MODELS = Path("models")
FOUNDATION_VAE = MODELS / "vae"
FOUNDATION = MODELS / "foundation"       # SD3 pipeline folder (model_index.json)
TEACHER = MODELS / "teacher"
STUDENT_STAGE1 = MODELS / "student_stage1"
STUDENT = MODELS / "student"
CHECKPOINTS = Path("checkpoints")
METRICS = Path("metrics")                # small JSON metric files, tracked by git (cache: false)
REPORTS = Path("reports")
DVCLIVE = Path("dvclive")
