"""The control-to-block mapping: which ControlNet layer's residual is added after which backbone block.

This is the single source of truth for the mapping. It is used to inject residuals into the backbone
(`expand_to_blocks`) and to pair student with teacher layers in L_af (`af_pairs`), so the two cannot
drift apart. It does not depend on the installed diffusers: we hand the backbone one residual per block,
for which every diffusers rule (``i // (n // n)`` before 0.32, ``int(i / (n / n))`` since) is the identity.

Conventions
-----------
``one_to_one``  The alimama SD3 inpainting teacher (23 layers on SD3-medium's 24 blocks) was trained with
                diffusers < 0.32, where ``interval = 24 // 23 = 1``: block i takes layer i, and the last
                block (``context_pre_only``) takes none. Valid when layers <= blocks.
``interval``    Block i takes layer ``i * layers // blocks`` (exact integer form of diffusers >= 0.32's
                ``int(i / (blocks / layers))``; 24 blocks / 12 layers: block i <- layer i // 2). Used for
                students: every layer is used for any ratio (24 / 10, 24 / 15), and the stock pipeline
                injects a student exactly as we train it.
Blocks whose mapped layer does not exist, and ``context_pre_only`` blocks, take no residual.

Which model uses which convention is written here too (``TEACHER_CONVENTION``, ``STUDENT_CONVENTION``,
``convention_of``): training, distillation, evaluation and the benchmark all read it from here.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

Convention = Literal["one_to_one", "interval"]
CONVENTIONS: tuple[str, ...] = ("one_to_one", "interval")
TEACHER_CONVENTION: Convention = "one_to_one"  # how the alimama teacher was trained (diffusers < 0.32)
STUDENT_CONVENTION: Convention = "interval"    # the stock pipeline's rule today: a student runs there unchanged
TEACHER = "teacher"                            # the teacher's name wherever models are listed by name


def convention_of(name: str) -> Convention:
    """The convention of a model listed by name: the teacher's for ``TEACHER``, else a student's."""
    return TEACHER_CONVENTION if name == TEACHER else STUDENT_CONVENTION


def control_to_block(
    num_blocks: int, num_layers: int, convention: Convention, skip_blocks: Sequence[int] = ()
) -> list[int | None]:
    """For each backbone block, the index of the control layer added after it, or None.

    ``skip_blocks``: blocks that never take a residual (SD3's last, ``context_pre_only`` block).
    """
    if num_layers < 1 or num_blocks < 1:
        raise ValueError(f"control_to_block: need >= 1 block and layer, got {num_blocks} blocks, {num_layers} layers")
    if num_layers > num_blocks:
        raise ValueError(f"control_to_block: {num_layers} control layers cannot feed {num_blocks} blocks")
    if convention == "one_to_one":
        layer_of = list(range(num_blocks))
    elif convention == "interval":
        layer_of = [i * num_layers // num_blocks for i in range(num_blocks)]
    else:
        raise ValueError(f"control_to_block: unknown convention {convention!r}; known: {list(CONVENTIONS)}")
    skip = set(skip_blocks)
    return [l if (l < num_layers and i not in skip) else None for i, l in enumerate(layer_of)]


def skipped_blocks(transformer) -> list[int]:
    """Blocks of an SD3Transformer2DModel that never take a control residual (``context_pre_only``)."""
    return [i for i, b in enumerate(transformer.transformer_blocks) if getattr(b, "context_pre_only", False)]


def backbone_mapping(transformer, num_layers: int, convention: Convention) -> list[int | None]:
    return control_to_block(len(transformer.transformer_blocks), num_layers, convention, skipped_blocks(transformer))


def expand_to_blocks(samples: Sequence[torch.Tensor], mapping: Sequence[int | None]) -> list[torch.Tensor]:
    """Per-layer residuals -> one residual per backbone block (zeros where none), for
    ``SD3Transformer2DModel(block_controlnet_hidden_states=...)``. With one entry per block every
    diffusers version adds entry i after block i, so ``mapping`` alone decides the injection."""
    used = [l for l in mapping if l is not None]
    if used and max(used) >= len(samples):
        raise ValueError(f"expand_to_blocks: mapping needs layer {max(used)} but got {len(samples)} samples")
    zero = torch.zeros_like(samples[0])
    return [samples[l] if l is not None else zero for l in mapping]


def af_pairs(
    num_blocks: int,
    teacher_layers: int,
    student_layers: int,
    teacher_convention: Convention = TEACHER_CONVENTION,
    student_convention: Convention = STUDENT_CONVENTION,
    skip_blocks: Sequence[int] = (),
) -> list[list[int]]:
    """For each student layer j, the teacher layers that feed the same backbone blocks as j.

    23 -> 12 on 24 blocks (block 23 skipped): student j <- teacher [2j, 2j+1] for j < 11 and
    student 11 <- teacher [22] alone (the paper's f^T_24 does not exist). A student layer that feeds only
    skipped blocks (15 layers on SD3's 24: layer 14 feeds block 23 alone, under the stock rule too) is
    never used by the backbone; it gets an empty list and no alignment term.
    """
    t_map = control_to_block(num_blocks, teacher_layers, teacher_convention, skip_blocks)
    s_map = control_to_block(num_blocks, student_layers, student_convention, skip_blocks)
    pairs: list[list[int]] = [[] for _ in range(student_layers)]
    for s, t in zip(s_map, t_map):
        if s is not None and t is not None and t not in pairs[s]:
            pairs[s].append(t)
    return pairs


def unused_layers(mapping: Sequence[int | None], num_layers: int) -> list[int]:
    """Control layers that no block takes a residual from."""
    return sorted(set(range(num_layers)) - {l for l in mapping if l is not None})
