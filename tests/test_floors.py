"""pyproject.toml's lower bounds hold: every version-sensitive API that pipeline/ and stages/ call is listed
below with the first release that has it and the evidence, and each package's floor in pyproject is at
least that release. A row whose call is gone from the code fails too (remove the row, and lower the floor
if nothing else needs it). The installed versions satisfy pyproject's ranges.

Evidence was read from the released wheels (``pip download PKG==X --no-deps``: the source of the last
release without the API and of the first with it), or, where noted, from the oldest wheel checked (the API
may be older; that version is then the bound asserted). Fast: no network, no import of the packages.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pipeline", "stages")
ARGS = r"(?:[^()]|\([^()]*\))*"  # a call's arguments up to the keyword sought (one level of nested calls)


@dataclass(frozen=True)
class Api:
    package: str      # the distribution, as pyproject names it
    min_version: str  # the first release that has the API (or the oldest checked that has it: see evidence)
    api: str          # what the code calls
    usage: str        # a regex that finds the call in the code of pipeline/ and stages/ (docstrings and
                      # comments excluded); ARGS spans lines, so multi-line calls match
    evidence: str


APIS = [
    # ---------------------------------------------------------------------------------------------- torch
    Api("torch", "2.7.0", "torch._dynamo.config.recompile_limit (distill.compile_blocks)",
        r"_dynamo\.config\.recompile_limit",
        "torch/_dynamo/config.py: the 2.6.0 wheel has only cache_size_limit (reading recompile_limit is an "
        "AttributeError); 2.7.0 defines recompile_limit, cache_size_limit becoming its alias"),
    Api("torch", "2.6.0", "torch.accelerator.is_available / current_accelerator (pipeline.device)",
        r"torch\.accelerator\.(is_available|current_accelerator)\(",
        "torch/accelerator/ is absent from the 2.5.1 wheel; 2.6.0 has is_available and current_accelerator"),
    Api("torch", "2.3.0", "torch.utils.swap_tensors (plan.trace._swappable)",
        r"torch\.utils\.swap_tensors",
        "def swap_tensors in torch/utils/__init__.py: absent in 2.2.0, present in 2.3.0"),
    Api("torch", "2.3.0", "torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(_backward) (plan.trace)",
        r"aten\._scaled_dot_product_flash_attention_for_cpu",
        "ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h and its meta registration: absent in the 2.2.0 "
        "wheel, present in 2.3.0 (looked up at import of pipeline.plan.trace)"),
    Api("torch", "2.2.0", "torch._subclasses.fake_tensor.unset_fake_temporarily (plan.trace)",
        r"\bunset_fake_temporarily\b",
        "def unset_fake_temporarily in torch/_subclasses/fake_tensor.py: absent in 2.1.0, present in 2.2.0"),
    Api("torch", "2.1.0", "Tensor.register_post_accumulate_grad_hook (plan.trace.grads_counted)",
        r"\.register_post_accumulate_grad_hook\(",
        "torch/_tensor.py of the 2.1.0 wheel (the oldest checked) has it"),
    Api("torch", "2.1.0", "torch.utils.flop_counter: FlopCounterMode(display=), flop_registry, sdpa_*flop_count",
        r"from torch\.utils\.flop_counter import",
        "torch/utils/flop_counter.py of the 2.1.0 wheel (the oldest checked) has all four"),
    Api("torch", "2.1.0", "nn.Module.compile(dynamic=False) (distill.compile_blocks)",
        r"\.compile\(dynamic=",
        "def compile in torch/nn/modules/module.py of the 2.1.0 wheel (the oldest checked)"),
    # ------------------------------------------------------------------------------------------ diffusers
    Api("diffusers", "0.40.0", "from_pretrained(dtype=...) of StableDiffusion3Pipeline and SD3ControlNetModel "
        "(models.world.load_foundation / load_controlnet)",
        r"(StableDiffusion3Pipeline|SD3ControlNetModel)\.from_pretrained\(" + ARGS + r"\bdtype=",
        "ModelMixin / DiffusionPipeline.from_pretrained pop 'dtype' first in 0.40.0 (modeling_utils.py, "
        "pipeline_utils.py); with 0.39.0, SD3ControlNetModel.from_pretrained(dir, dtype=torch.bfloat16) raises "
        "TypeError: __init__() got an unexpected keyword argument 'dtype' (run against both wheels)"),
    Api("diffusers", "0.33.0", "training_utils.compute_density_for_timestep_sampling(generator=) (models.flow)",
        r"compute_density_for_timestep_sampling\(" + ARGS + r"\bgenerator=",
        "its signature in training_utils.py: no generator in 0.32.2, generator (and device) in 0.33.0"),
    Api("diffusers", "0.32.0", "SD3ControlNetModel(extra_conditioning_channels=, dual_attention_layers=, "
        "force_zeros_for_pooled_projection=) (models.student)",
        r"SD3ControlNetModel\(" + ARGS + r"force_zeros_for_pooled_projection=",
        "models/controlnets/controlnet_sd3.py of the 0.32.0 wheel (the oldest checked) takes all three"),
    Api("diffusers", "0.32.0", "training_utils.EMAModel(params, decay=, use_ema_warmup=) (training, plan.steps)",
        r"EMAModel\(" + ARGS + r"use_ema_warmup=",
        "training_utils.py of the 0.32.0 wheel (the oldest checked)"),
    # --------------------------------------------------------------------------------------- transformers
    Api("transformers", "5.4.0", "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil "
        "(models.standins, plan.models)",
        r"image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil",
        "the module is absent from the 5.0.0-5.3.0 wheels; 5.4.0 has it (class Qwen2VLImageProcessorPil)"),
    Api("transformers", "5.4.0", "AutoImageProcessor.from_pretrained(backend=\"pil\") (captions.qwen.load_processor)",
        r"AutoImageProcessor\.from_pretrained\(" + ARGS + r"\bbackend=",
        "models/auto/image_processing_auto.py: no backend argument in 5.3.0; _resolve_backend and the "
        "torchvision/pil mappings in 5.4.0"),
    Api("transformers", "5.0.0", "CLIPTokenizer(model_max_length=...) without vocab files, then trained "
        "(models.world.train_tokenizer)",
        r"CLIPTokenizer\(model_max_length=",
        "4.57.6 (the last 4.x): CLIPTokenizer(PreTrainedTokenizer) requires vocab_file and merges_file; 5.0.0: "
        "CLIPTokenizer(TokenizersBackend) with vocab and merges optional"),
    Api("transformers", "4.56.0", "from_pretrained(dtype=...) (captions.qwen.QwenCaptioner)",
        r"Qwen2_5_VLForConditionalGeneration\.from_pretrained\(" + ARGS + r"\bdtype=",
        "modeling_utils.py: 4.55.4 takes only torch_dtype; 4.56.0 pops dtype and warns that torch_dtype is "
        "deprecated"),
    Api("transformers", "4.56.0", "PretrainedConfig.dtype (plan.models._config sets it)",
        r"config\.dtype\s*=",
        "configuration_utils.py: 4.56.0 stores dtype, torch_dtype being a property over it; 4.55.4 has only "
        "torch_dtype, so setting .dtype changes nothing the model reads"),
    # ----------------------------------------------------------------------------------------- accelerate
    Api("accelerate", "1.0.0", "PartialState(cpu=, **InitProcessGroupKwargs(timeout=).to_kwargs()) (distributed)",
        r"PartialState\(cpu=",
        "state.py / utils/dataclasses.py of the 1.0.0 wheel (the oldest checked)"),
    Api("accelerate", "1.0.0", "the ACCELERATE_TORCH_DEVICE override (training.Loop._accelerator)",
        r"ACCELERATE_TORCH_DEVICE",
        "state.py of the 1.0.0 wheel reads it (the oldest checked)"),
    Api("accelerate", "1.0.0", "AcceleratorState._reset_state(reset_partial_state) (plan.steps.fresh_accelerate)",
        r"AcceleratorState\._reset_state\(True\)",
        "state.py of the 1.0.0 wheel: _reset_state(reset_partial_state: bool = False) (the oldest checked)"),
    # -------------------------------------------------------------------------------- orchestration, logs
    Api("prefect", "3.1.12", "prefect.cache_policies.NO_CACHE (orchestration.stages, .concurrent)",
        r"from prefect\.cache_policies import NO_CACHE",
        "cache_policies.py: only NONE in 3.1.11; NO_CACHE from 3.1.12"),
    Api("prefect", "3.0.1", "@task(retry_condition_fn=) (orchestration.stages, .concurrent)",
        r"retry_condition_fn=",
        "tasks.py of the 3.0.1 wheel (the oldest checked)"),
    Api("dvclive", "3.45.0", "Live(dir, resume=, dvcyaml=None, save_dvc_exp=False, report=None) (training._live)",
        r"Live\(" + ARGS + r"dvcyaml=None",
        "live.py of the 3.45.0 wheel (the oldest checked): dvcyaml: Optional[str], None = no dvc.yaml"),
    Api("great-expectations", "1.3.0", "gx.get_context(mode=\"ephemeral\"), data_sources.add_pandas, suites, "
        "validation_definitions (validation.gx)",
        r"get_context\(mode=\"ephemeral\"\)",
        "the 1.3.0 wheel (the oldest checked): context_factory.get_context(mode=), AbstractDataContext."
        "data_sources / suites / validation_definitions, every expectation class validation.gates names"),
    Api("torchmetrics", "1.0.0", "FrechetInceptionDistance(feature_extractor_weights_path=) (evaluation.quality)",
        r"FrechetInceptionDistance\(" + ARGS + r"feature_extractor_weights_path=",
        "image/fid.py of the 1.0.0 wheel (the oldest checked)"),
]


def _slug(api: str) -> str:
    return re.sub(r"\W+", "_", api.split(" (")[0]).strip("_")[:48]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(extras: tuple[str, ...] = ()) -> dict[str, Requirement]:
    project = _pyproject()["project"]
    reqs = [*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e])]
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


def floor(req: Requirement) -> Version | None:
    """The lowest version ``req`` admits by its lower-bound clauses (>=, >, ==, ~=); None without one."""
    lows = [Version(s.version.removesuffix(".*")) for s in req.specifier if s.operator in (">=", ">", "==", "~=")]
    return max(lows) if lows else None


def code_text(path: Path) -> str:
    """``path``'s source with its docstrings (string statements) and comments blanked: what it calls."""
    src = path.read_text(encoding="utf-8")
    lines = src.splitlines(keepends=True)
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for i in range(node.lineno - 1, node.end_lineno):
                lines[i] = "\n"
    for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col].rstrip() + "\n"
    return "".join(lines)


@cache
def sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): code_text(p)
            for d in SOURCES for p in sorted((ROOT / d).rglob("*.py"))}


@pytest.mark.parametrize("row", APIS, ids=lambda r: f"{r.package}>={r.min_version}:{_slug(r.api)}")
def test_the_code_still_calls_it(row: Api):
    hits = [f for f, text in sources().items() if re.search(row.usage, text)]
    assert hits, (f"{row.api}: no call left in {'/, '.join(SOURCES)}/ (regex {row.usage!r}); remove its row "
                  f"from tests/test_floors.py, and lower {row.package}'s floor if no other row needs it")


@pytest.mark.parametrize("row", APIS, ids=lambda r: f"{r.package}>={r.min_version}:{_slug(r.api)}")
def test_the_floor_admits_no_release_without_it(row: Api):
    reqs = _requirements()
    name = canonicalize_name(row.package)
    assert name in reqs, f"{row.package} is called ({row.api}) but is not a dependency in pyproject.toml"
    low = floor(reqs[name])
    assert low is not None and low >= Version(row.min_version), (
        f"pyproject.toml: {reqs[name]} admits {row.package} {low or 'of any version'}, but the code calls "
        f"{row.api}, first in {row.min_version} ({row.evidence}); raise the floor to >={row.min_version}")


def test_the_table_is_well_formed():
    assert len({(r.package, r.usage) for r in APIS}) == len(APIS), "a row is listed twice"
    for r in APIS:
        Version(r.min_version)
        re.compile(r.usage)
        assert r.evidence and r.api


@pytest.mark.parametrize("name", sorted(_requirements(("test",))))
def test_the_installed_version_is_in_pyprojects_range(name: str):
    req = _requirements(("test",))[name]
    if req.marker is not None and not req.marker.evaluate():
        pytest.skip(f"{req}: not for this platform")
    try:
        installed = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        pytest.fail(f"{req} (pyproject.toml) is not installed")
    assert req.specifier.contains(installed, prereleases=True), (
        f"installed {req.name} {installed} is outside pyproject.toml's {req}")


def test_floor_reads_lower_bounds_only():
    assert floor(Requirement("torch>=2.7,<2.14")) == Version("2.7")
    assert floor(Requirement("diffusers~=0.40.1")) == Version("0.40.1")
    assert floor(Requirement("accelerate==1.2.*")) == Version("1.2")
    assert floor(Requirement("x<2")) is None
