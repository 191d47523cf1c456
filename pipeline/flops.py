"""FLOPs model of one training step, for TFLOPs/s and MFU per GPU.

Convention (PaLM's, as torchtitan reports MFU): **model FLOPs**, the matmul FLOPs the step's
mathematics needs — 2·N per token forward, 2·N for the input gradient and 2·N for the weight
gradient of the weights that train (so 6·N·tokens under full fine-tuning) — plus attention;
**no recompute**: neither activation-checkpointing's re-forward nor the stage-2 embedding
cache's no-grad pass is counted, so MFU does not rise when memory is traded for compute.

Counted separately because they go through different networks:

* **vision patches** ``P`` (rows of ``pixel_values``; an image of grid t×h×w has t·h·w patches)
  go through the ViT with ``N_vit`` parameters, ``L_v`` layers of width ``d_v``;
* **text tokens** ``T`` (every non-padding position of the language model's input, visual
  tokens included: one per ``merge²`` patches) go through the LLM's ``N_llm`` parameters
  (embedding table and output head excluded: a lookup is not a matmul, and the head is not run
  on every token), ``L`` layers of width ``d``;
* **head tokens** ``H``: the positions the output head (vocab × d, tied or not) runs on: stage 1
  computes logits only at its target tokens (pipeline/model.py), stage 2 never runs it.

Forward FLOPs (multiply-add = 2 FLOPs):

    F_llm  = 2·N_llm·T + 2·L·d·Σ_seq s²      (causal attention: QKᵀ and AV over s²/2 pairs, ×2 matmuls)
    F_head = 2·V·d·H
    F_vit  = 2·N_vit·P + 4·L_v·d_v·Σ_img p²  (bidirectional attention within each image)

Backward: a linear layer costs 1× its forward for the input gradient plus 1× for the weight
gradient, the latter only when the weights train.  With LoRA (frozen base weights and head) the
LLM's matmuls cost 1× forward in backward, 2× under full fine-tuning; attention (no weights)
always 2×.  A frozen vision tower whose input needs no gradient has no backward at all.

The model ignores LoRA's own matmuls (r ≪ d), norms, activations and softmax (O(d) per token),
and Qwen2.5-VL's windowed vision attention (counted as full attention: an upper bound).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

# Dense bf16 peak per device (FLOP/s), for MFU.  Matched by substring of the device name.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,   # SXM; PCIe and NVL are matched first below (longer names win)
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "B200": 2250e12,
    "B100": 1750e12,
    "GB200": 2500e12,
    "GH200": 989e12,
    "L4": 121e12,
    "A40": 150e12,
}


def peak_flops(device_name: str, override_tflops: Optional[float] = None) -> Optional[float]:
    """Peak dense bf16 FLOP/s of ``device_name`` (None when unknown, e.g. a CPU: then MFU is
    not reported unless ``override_tflops`` gives the peak in TFLOP/s)."""
    if override_tflops:
        return override_tflops * 1e12
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_FLOPS[key]
    return None


@dataclass
class FlopsModel:
    llm_params: int          # language-model parameters less the embedding table and the output head
    llm_layers: int
    llm_hidden: int
    vit_params: int
    vit_layers: int
    vit_hidden: int
    train_llm_weights: bool  # full fine-tuning (True) or LoRA / frozen base (False)
    train_vit: bool = False
    head_params: int = 0     # vocab × hidden of the output head (tied or not)

    def step_flops(self, seq_lens: Iterable[int], image_patches: Iterable[int], *, head_tokens: int = 0) -> float:
        """Model FLOPs of forward + backward over a batch (see the module docstring).

        seq_lens: non-padding length of every LLM sequence in the batch (tokens).
        image_patches: patch count t·h·w of every image in the batch.
        head_tokens: positions the output head runs on (stage 1: target tokens; stage 2: 0).
        """
        seq_lens = [int(s) for s in seq_lens]
        image_patches = [int(p) for p in image_patches]
        tokens, patches = sum(seq_lens), sum(image_patches)
        llm_mm = 2.0 * self.llm_params * tokens + 2.0 * self.head_params * int(head_tokens)
        llm_attn = 2.0 * self.llm_layers * self.llm_hidden * sum(s * s for s in seq_lens)
        vit_mm = 2.0 * self.vit_params * patches
        vit_attn = 4.0 * self.vit_layers * self.vit_hidden * sum(p * p for p in image_patches)

        fwd = llm_mm + llm_attn + vit_mm + vit_attn
        bwd = (2.0 if self.train_llm_weights else 1.0) * llm_mm + 2.0 * llm_attn
        if self.train_vit:
            bwd += 2.0 * (vit_mm + vit_attn)
        return fwd + bwd

    @classmethod
    def from_model(cls, model: Any, *, train_llm_weights: bool, train_vit: bool = False) -> "FlopsModel":
        """Read sizes off a Hugging Face Qwen2-VL / Qwen2.5-VL model (plain, PEFT-wrapped or
        ZeRO-3-partitioned: :func:`pipeline.engine.full_numel`)."""
        from pipeline.engine import full_numel

        llm = vit = 0
        for name, p in model.named_parameters():
            n = full_numel(p)
            if "lora_" in name:
                continue
            if ".visual." in f".{name}":
                vit += n
            elif "embed_tokens" in name or "lm_head" in name:
                continue
            else:
                llm += n
        cfg = getattr(model, "config", None)
        while cfg is not None and not hasattr(cfg, "vision_config") and hasattr(model, "base_model"):
            model = model.base_model
            cfg = getattr(model, "config", None)
        text = getattr(cfg, "text_config", None) or cfg
        vis = getattr(cfg, "vision_config", None)
        vit_hidden = 0
        if vis is not None:
            # Qwen2-VL: embed_dim = ViT width; Qwen2.5-VL: hidden_size = ViT width.
            vit_hidden = int(getattr(vis, "embed_dim", 0) or getattr(vis, "hidden_size", 0))
        return cls(
            llm_params=llm,
            llm_layers=int(getattr(text, "num_hidden_layers", 0)),
            llm_hidden=int(getattr(text, "hidden_size", 0)),
            vit_params=vit,
            vit_layers=int(getattr(vis, "depth", 0)) if vis is not None else 0,
            vit_hidden=vit_hidden,
            train_llm_weights=train_llm_weights,
            train_vit=train_vit,
            head_params=int(getattr(text, "vocab_size", 0)) * int(getattr(text, "hidden_size", 0)),
        )


def target_tokens(batch: Any) -> int:
    """Stage-1 target tokens of a collated batch (``labels`` ≠ -100): where the head runs."""
    labels = batch.get("labels") if isinstance(batch, dict) or hasattr(batch, "keys") else None
    return int((labels != -100).sum()) if labels is not None else 0


def batch_shape_stats(batch: Any) -> tuple[list[int], list[int]]:
    """(sequence lengths, image patch counts) of a collated batch: every ``attention_mask``
    [B, L] (2-D, 1 = real token) and ``image_grid_thw`` [n_img, 3] found in it, nested dicts
    included (stage-2 batches hold a query and a candidate side)."""
    seqs: list[int] = []
    patches: list[int] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k == "attention_mask" and hasattr(v, "dim") and v.dim() == 2:
                    seqs.extend(int(x) for x in v.sum(dim=1).tolist())
                elif k == "image_grid_thw" and hasattr(v, "prod") and v is not None and v.numel():
                    patches.extend(int(x) for x in v.prod(dim=-1).tolist())
                else:
                    walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
        elif hasattr(obj, "keys") and hasattr(obj, "__getitem__") and not hasattr(obj, "dim"):
            walk({k: obj[k] for k in obj.keys()})

    walk(batch)
    return seqs, patches
