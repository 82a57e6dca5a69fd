"""`qwen2_5_vl` backend: local and global prompts from Qwen2.5-VL (transformers), batched, cached.

The masked region is shown twice, per the params template: as a crop around the hole and as the whole
image with the hole tinted (overlay). trust_remote_code is always False.
"""

from __future__ import annotations

import functools
import re

import numpy as np
from PIL import Image

from pipeline.captions.cache import CaptionCache, cache_key
from pipeline.config import QwenConfig
from pipeline.data.images import load_mask, open_image


def region_views(image: Image.Image, hole: np.ndarray, cfg: QwenConfig) -> tuple[Image.Image, Image.Image]:
    """(crop around the hole, overlay of the hole on the whole image), both vlm_image_size square."""
    h, w = hole.shape
    ys, xs = np.nonzero(hole)
    pad = cfg.crop_padding * max(w, h)
    box = (max(0, int(xs.min() - pad)), max(0, int(ys.min() - pad)),
           min(w, int(xs.max() + 1 + pad)), min(h, int(ys.max() + 1 + pad)))
    size = (cfg.vlm_image_size, cfg.vlm_image_size)
    crop = image.crop(box).resize(size, Image.BICUBIC)
    arr = np.asarray(image, dtype=np.float32).copy()
    arr[hole] = (1 - cfg.overlay_alpha) * arr[hole] + cfg.overlay_alpha * np.array(cfg.overlay_color)
    overlay = Image.fromarray(arr.clip(0, 255).astype(np.uint8)).resize(size, Image.NEAREST)
    return crop, overlay


def clean(text: str) -> str:
    text = text.strip().splitlines()[0] if text.strip() else ""
    return re.sub(r"\s+", " ", text).strip(" .\"'")


@functools.cache
def _images_only_processor_class():
    """Qwen2_5_VLProcessor, less its video processor.

    transformers builds Qwen2_5_VLProcessor with a video processor, and Qwen2VLVideoProcessor needs
    torchvision (AutoProcessor fails without it). Captioning sends images only: this subclass lets the
    video processor be None and changes nothing else, so chat template, image-token expansion,
    ``mm_token_type_ids`` (which the model needs for its 3D rotary positions) and decoding are the real
    class's."""
    from transformers import Qwen2_5_VLProcessor

    class Qwen2_5_VLImagesOnlyProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return Qwen2_5_VLImagesOnlyProcessor


def load_processor(model: str, revision: str | None = None):
    """The model's Qwen2_5_VLProcessor: AutoProcessor where torchvision is installed; else the same class
    without its video processor, over the folder's tokenizer and its image processor's PIL backend."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model, revision=revision, trust_remote_code=False)
    cls = _images_only_processor_class()
    tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=False)
    image_processor = AutoImageProcessor.from_pretrained(model, revision=revision, backend="pil",
                                                         trust_remote_code=False)
    # the processor's own chat template (chat_template.json/.jinja) first, as from_pretrained reads it
    processor_dict, _ = cls.get_processor_dict(model, revision=revision)
    template = processor_dict.get("chat_template") or tokenizer.chat_template
    return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=template)


class QwenCaptioner:
    def __init__(self, cfg: QwenConfig):
        import torch
        from transformers import Qwen2_5_VLForConditionalGeneration

        from pipeline.runtime import resolve_device

        self.cfg = cfg
        self.torch = torch
        self.device = resolve_device(cfg.device)  # the one device policy; the VLM keeps its own keys
        dtype = getattr(torch, cfg.dtype)
        self.processor = load_processor(cfg.model, cfg.revision)
        self.processor.tokenizer.padding_side = "left"  # batched generation
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            cfg.model, revision=cfg.revision, dtype=dtype, trust_remote_code=False).to(self.device).eval()
        self.template = {k: getattr(cfg, k) for k in
                         ("local_template", "global_template", "max_new_tokens", "vlm_image_size",
                          "crop_padding", "overlay_color", "overlay_alpha", "revision")}

    def _generate(self, conversations: list[list[dict]], images: list[list[Image.Image]]) -> list[str]:
        texts = [self.processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations]
        flat = [im for ims in images for im in ims]
        inputs = self.processor(text=texts, images=flat, padding=True, return_tensors="pt").to(self.device)
        with self.torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [clean(t) for t in self.processor.batch_decode(new, skip_special_tokens=True)]

    def caption_batch(self, rows: list[dict]) -> list[tuple[str, str]]:
        local_conv, local_imgs, global_conv, global_imgs = [], [], [], []
        for r in rows:
            image = open_image(r["image"]).convert("RGB")
            crop, overlay = region_views(image, load_mask(r["mask"]), self.cfg)
            local_conv.append([{"role": "user", "content": [
                {"type": "image"}, {"type": "image"}, {"type": "text", "text": self.cfg.local_template}]}])
            local_imgs.append([crop, overlay])
            size = (self.cfg.vlm_image_size, self.cfg.vlm_image_size)
            global_conv.append([{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": self.cfg.global_template}]}])
            global_imgs.append([image.resize(size, Image.BICUBIC)])
        return list(zip(self._generate(local_conv, local_imgs), self._generate(global_conv, global_imgs)))

    def caption(self, rows: list[dict], cache: CaptionCache, progress: bool = True) -> list[tuple[str, str]]:
        """Captions for `rows` (dicts with image, mask paths); cached rows are not recomputed."""
        from tqdm import tqdm

        keys = [cache_key(r["image"], r["mask"], self.cfg.model, self.template) for r in rows]
        todo = [i for i, k in enumerate(keys) if cache.get(k) is None]
        bs = self.cfg.batch_size
        for start in tqdm(range(0, len(todo), bs), desc="qwen2.5-vl", disable=not progress):
            idx = todo[start:start + bs]
            results = self.caption_batch([rows[i] for i in idx])
            cache.put_many([{"key": keys[i], "local": loc, "global": glo} for i, (loc, glo) in zip(idx, results)])
        return [(cache.entries[k]["local"], cache.entries[k]["global"]) for k in keys]
