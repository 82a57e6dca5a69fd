"""The one prompt writer: global and local prompts from a scene record (generator and captioner share it).

Objects are dicts {shape, color, bbox, layer}. Global prompt: every object grouped by (colour, shape) in
order of first appearance, plus the background ("two red circles and a blue square on a striped
background"). Local prompt: only what lies under the mask ("a red circle", or "striped background").
"""

from __future__ import annotations

import numpy as np

NUMBERS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
PLURALS = {"cross": "crosses"}
# An object counts as "under the mask" when at least this share of its visible pixels is in the hole.
COVER_THRESHOLD = 0.5


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else PLURALS.get(shape, shape + "s")


def _count(n: int, next_word: str) -> str:
    if n == 1:
        return "an" if next_word[:1] in "aeiou" else "a"
    return NUMBERS.get(n, str(n))


def describe_objects(objects: list[dict]) -> str:
    """'two red circles and a blue square' (grouped by colour+shape, first-appearance order)."""
    groups: dict[tuple[str, str], int] = {}
    for obj in objects:
        key = (obj["color"], obj["shape"])
        groups[key] = groups.get(key, 0) + 1
    parts = [f"{_count(n, color)} {color} {_plural(shape, n)}" for (color, shape), n in groups.items()]
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def background_phrase(background: str) -> str:
    return f"{background} background"


def global_prompt(objects: list[dict], background: str) -> str:
    if not objects:
        return background_phrase(background)
    return f"{describe_objects(objects)} on a {background_phrase(background)}"


def local_prompt(objects: list[dict], background: str, covered: list[int] | None) -> str:
    """Prompt for a masked region covering the objects at indices `covered` (empty: background only)."""
    chosen = [objects[i] for i in (covered or [])]
    return describe_objects(chosen) if chosen else background_phrase(background)


def covered_objects(instances: np.ndarray, hole: np.ndarray, n_objects: int) -> list[int]:
    """Indices of objects whose visible pixels (instance label k+1) are mostly inside the hole."""
    out = []
    for k in range(n_objects):
        visible = instances == k + 1
        count = int(visible.sum())
        if count and (visible & hole).sum() / count >= COVER_THRESHOLD:
            out.append(k)
    return out


def local_prompt_for_mask(objects: list[dict], background: str, instances: np.ndarray, hole: np.ndarray) -> str:
    """Local prompt of an arbitrary mask, from the instance map (hole: bool array, True = repaint)."""
    return local_prompt(objects, background, covered_objects(instances, hole, len(objects)))
