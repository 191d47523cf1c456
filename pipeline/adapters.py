"""Family adapters: everything that differs between VLM families, in one small class each.

The CoMa model (pipeline/model.py) never touches a family's module tree or prompt format
directly; it asks the adapter for:

* the pieces of the Hugging Face model: ``language_model`` (the decoder stack that takes
  ``inputs_embeds``), ``lm_head``, ``visual`` (the vision tower), the input embedding;
* ``embed``: token embeddings with the image features written over the image-pad tokens;
* ``position_ids``: the rotary positions of a whole padded batch (M-RoPE for Qwen-VL:
  ``[3, B, L]``), computed once per sequence so every attention path sees identical positions;
* ``dummy_vision_inputs``: the smallest legal image, for the ZeRO-3 dummy-vision guard;
* the prompt format: ChatML turns (the vision span's ids come from :mod:`pipeline.processing`);
* ``image_processor``: the PIL-only image processor (no torchvision anywhere).

A third family (e.g. LLaVA-OneVision) is a new subclass registered in :data:`ADAPTERS`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch


class FamilyAdapter(ABC):
    """The interface every family implements (see the module docstring)."""

    name: str = ""
    model_types: tuple[str, ...] = ()

    # -------------------------------------------------------------------------------- modules
    @staticmethod
    @abstractmethod
    def language_model(hf) -> torch.nn.Module:
        """The decoder stack taking ``inputs_embeds``/``position_ids``/``attention_mask``."""

    @staticmethod
    def lm_head(hf) -> torch.nn.Module:
        return hf.lm_head

    @staticmethod
    @abstractmethod
    def visual(hf) -> torch.nn.Module:
        """The vision tower (frozen by default)."""

    @staticmethod
    @abstractmethod
    def merge_size(hf_config) -> int:
        """Vision patches merged per side into one LM token."""

    @staticmethod
    @abstractmethod
    def image_processor(path: str, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None):
        """The family's PIL-only image processor, loaded from the checkpoint directory."""

    # ---------------------------------------------------------------------------- prompt parts
    @abstractmethod
    def system_block(self) -> str:
        """Text before the first user turn (may be empty)."""

    @abstractmethod
    def user_open(self) -> str: ...

    @abstractmethod
    def turn_close(self) -> str: ...

    @abstractmethod
    def assistant_open(self) -> str: ...

    # -------------------------------------------------------------------------------- compute
    @abstractmethod
    def embed(self, hf, input_ids, pixel_values, image_grid_thw, dummy_vision: bool = False) -> torch.Tensor: ...

    @abstractmethod
    def position_ids(self, hf, input_ids, attention_mask, mm_token_type_ids, image_grid_thw) -> torch.Tensor: ...


class QwenVLAdapter(FamilyAdapter):
    """Qwen2-VL and Qwen2.5-VL: ChatML prompts, ``<|image_pad|>`` vision tokens, M-RoPE."""

    system_prompt = "You are a helpful assistant."  # what Qwen's template inserts by default

    @staticmethod
    def language_model(hf) -> torch.nn.Module:
        return hf.model.language_model

    @staticmethod
    def visual(hf) -> torch.nn.Module:
        return hf.model.visual

    # ChatML, exactly as Qwen's chat template renders it.
    def system_block(self) -> str:
        return f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n"

    def user_open(self) -> str:
        return "<|im_start|>user\n"

    def turn_close(self) -> str:
        return "<|im_end|>\n"

    def assistant_open(self) -> str:
        return "<|im_start|>assistant\n"

    @staticmethod
    def merge_size(hf_config) -> int:
        return int(hf_config.vision_config.spatial_merge_size)

    @staticmethod
    def image_processor(path: str, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None):
        """The PIL-only Qwen2-VL image processor (Qwen2.5-VL uses the same one)."""
        from transformers import Qwen2VLImageProcessorPil

        kw = {}
        if min_pixels is not None:
            kw["min_pixels"] = int(min_pixels)
        if max_pixels is not None:
            kw["max_pixels"] = int(max_pixels)
        return Qwen2VLImageProcessorPil.from_pretrained(path, **kw)

    # ------------------------------------------------------------------------------- compute
    def embed(self, hf, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
              image_grid_thw: Optional[torch.Tensor], dummy_vision: bool = False) -> torch.Tensor:
        """Token embeddings with image features scattered over the image-pad tokens.

        input_ids [B, L] long; pixel_values [P, C·T·p·p] (all images' patches, concatenated);
        image_grid_thw [N_img, 3] long.  Returns inputs_embeds [B, L, D] in the LM's dtype.

        ``dummy_vision``: with no image in the batch, run the vision tower on the smallest legal
        image anyway and add ``0 * features.sum()`` so that, under ZeRO-3, this rank gathers the
        vision parameters exactly like ranks whose batches hold images (otherwise collectives
        mismatch and the job crashes or hangs).
        """
        inner = hf.model
        embeds = inner.get_input_embeddings()(input_ids)
        visual = inner.visual
        if pixel_values is not None and image_grid_thw is not None and image_grid_thw.numel() > 0:
            feats = visual(pixel_values.to(visual.dtype), grid_thw=image_grid_thw).pooler_output
            feats = feats.to(embeds.device, embeds.dtype)
            mask = input_ids == hf.config.image_token_id
            n = int(mask.sum())
            if n != feats.shape[0]:
                raise ValueError(f"batch has {n} image-pad tokens but the vision tower produced {feats.shape[0]} "
                                 "features: the collator's token expansion disagrees with image_grid_thw")
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats)
        elif dummy_vision:
            pv, grid = self.dummy_vision_inputs(hf, embeds.device)
            feats = visual(pv.to(visual.dtype), grid_thw=grid).pooler_output
            embeds = embeds + 0.0 * feats.to(embeds.dtype).sum()
        return embeds

    def dummy_vision_inputs(self, hf, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest legal image: one merge window of patches → one visual token."""
        vc = hf.config.vision_config
        m = int(vc.spatial_merge_size)
        patch_dim = int(vc.in_channels) * int(vc.temporal_patch_size) * int(vc.patch_size) ** 2
        pv = torch.zeros(m * m, patch_dim, device=device)
        grid = torch.tensor([[1, m, m]], device=device, dtype=torch.long)
        return pv, grid

    def position_ids(self, hf, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     mm_token_type_ids: Optional[torch.Tensor], image_grid_thw: Optional[torch.Tensor]
                     ) -> torch.Tensor:
        """M-RoPE positions ``[3, B, L]`` (long) of the padded batch, via the family's own
        ``get_rope_index`` (padding positions get 0; real tokens are numbered per sequence)."""
        if mm_token_type_ids is None:
            mm_token_type_ids = (input_ids == hf.config.image_token_id).to(torch.int32)
        grid = image_grid_thw if image_grid_thw is not None and image_grid_thw.numel() > 0 else None
        pos, _ = hf.model.get_rope_index(input_ids, mm_token_type_ids=mm_token_type_ids,
                                         image_grid_thw=grid, attention_mask=attention_mask)
        return pos


class Qwen2VLAdapter(QwenVLAdapter):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)


class Qwen25VLAdapter(QwenVLAdapter):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)


ADAPTERS: dict[str, type[FamilyAdapter]] = {a.name: a for a in (Qwen2VLAdapter, Qwen25VLAdapter)}


def adapter_for(model_type: str, family: str = "auto") -> FamilyAdapter:
    """Pick the adapter from ``model_cfg.family`` or, for ``auto``, the checkpoint's model_type."""
    if family != "auto":
        if family not in ADAPTERS:
            raise ValueError(f"model.family={family!r} is not supported; choose one of {sorted(ADAPTERS)} or auto")
        return ADAPTERS[family]()
    for cls in ADAPTERS.values():
        if model_type in cls.model_types:
            return cls()
    raise ValueError(f"checkpoint model_type {model_type!r} has no adapter; supported: "
                     f"{[t for c in ADAPTERS.values() for t in c.model_types]} (see pipeline/adapters.py)")
