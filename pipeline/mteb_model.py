"""A CoMa model as an ``mteb`` 2.x encoder: MTEB / MIEB tasks with the inputs our MMEB harness builds.

    import mteb
    from pipeline.mteb_model import CoMaMTEB
    model = CoMaMTEB("runs/stage2/export")
    mteb.evaluate(model, mteb.get_tasks(tasks=["CIFAR10ZeroShot"]), cache=mteb.ResultCache("runs/stage2/mteb"))

(``launch/eval_mteb.py`` does this and prints a summary.)  Needs the optional extra:
``pip install -e ".[mteb]"`` (mteb's base install; its ``image`` extra, which brings torchvision,
is not needed: images reach :meth:`CoMaMTEB.encode` as PIL images).

Every input goes through :class:`pipeline.embedder.Embedder`, so the prompt format, the image bounds,
``max_text_tokens`` and the pooling are those of training and of ``launch/eval_mmeb.py``.  mteb
hands over text, images or both per item; they become MMEB-style items, the task's instruction
where MMEB puts it:

* image (and text): ``"<image>\\n{instruction} {text}"`` — the image first, as in MMEB's
  ``<|image_1|>\\nRepresent the given image …`` queries;
* text only: ``"{instruction} {text}"``, as MMEB's ``Find me an everyday image that matches …:``.

The instruction is mteb's (``AbsEncoder.get_instruction``: ``prompts[task name]``,
``prompts[task type]``, ``prompts["query"]``, the task's own prompt, then the task type's generic
one).  Retrieval documents get none unless one is given for them (the task's prompt dict or
``prompts["document"]``): MMEB's text candidates carry no instruction, and neither do the
documents of mteb's other instruction-following multimodal wrappers (e.g. GME).  An image with no
text and no instruction gets what the Embedder gives any text-less image (the model's
instruction, or the default summarise instruction in the chat format).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction

from pipeline.embedder import Embedder
from pipeline.export import META_FILE, read_meta
from pipeline.prompts import IMAGE_PLACEHOLDER

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.types import BatchedInput, PromptType
    from torch.utils.data import DataLoader

CITATION = """@article{coma2025,
  title={Compression then Matching: An Efficient Pre-training Paradigm for Multimodal Embedding},
  journal={arXiv preprint arXiv:2511.08480},
  year={2025}
}"""


def mmeb_item(text: Optional[str], image: Any, instruction: str = "") -> dict:
    """One mteb input → an Embedder item, the instruction placed as MMEB places it."""
    words = " ".join(p for p in (instruction.strip(), (text or "").strip()) if p)
    if image is None:
        return {"text": words}
    return {"text": f"{IMAGE_PLACEHOLDER}\n{words}" if words else None, "image": image}


def local_revision(path: str | os.PathLike) -> str:
    """A revision for a local model directory: 12 hex digits of its config (and coma.json), so two
    different exports in the same folder do not share mteb's results folder."""
    h = hashlib.sha256()
    for name in ("config.json", META_FILE):
        f = Path(path) / name
        if f.exists():
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def model_meta(path: str | os.PathLike, embedder: Embedder, name: Optional[str] = None,
               revision: Optional[str] = None) -> ModelMeta:
    """mteb's model card for a local export: ``local/<folder>`` unless ``name`` (``org/model``)."""
    meta = read_meta(path)
    hf = embedder.model.hf
    text_cfg = hf.config.get_text_config()
    return ModelMeta(
        loader=CoMaMTEB, name=name or f"local/{Path(path).resolve().name}",
        revision=revision or local_revision(path), release_date=None, languages=["eng-Latn"],
        n_parameters=sum(p.numel() for p in hf.parameters()),
        n_embedding_parameters=hf.get_input_embeddings().weight.numel(), memory_usage_mb=None,
        max_tokens=getattr(text_cfg, "max_position_embeddings", None), embed_dim=text_cfg.hidden_size,
        license=None, open_weights=True, public_training_code=None, public_training_data=None,
        framework=["PyTorch", "Transformers"], similarity_fn_name=ScoringFunction.COSINE,
        use_instructions=True, training_datasets=None, modalities=["image", "text"], model_type=["dense"],
        adapted_from=meta.get("source"), citation=CITATION)


class CoMaMTEB(AbsEncoder):
    """mteb's encoder protocol over :class:`Embedder` (``encode`` → float32 [N, D], L2-normalised,
    compared by cosine).

    ``model_name``: an export (``launch/export.py``), a released CoMa checkpoint or a plain VLM
    directory (the untrained baseline), as ``Embedder.from_pretrained`` takes it.  ``prompts``:
    instructions by task name, task type or ``"query"``/``"document"`` (mteb's ``prompts_dict``).
    ``name`` / ``revision``: how mteb files the results (default ``local/<folder>`` and a hash of
    the config)."""

    def __init__(self, model_name: str, revision: Optional[str] = None, device: Optional[str] = None, *,
                 batch_size: int = 32, pooling: Optional[str] = None, dtype: Optional[str] = None,
                 prompts: Optional[dict[str, str]] = None, name: Optional[str] = None, **kwargs: Any) -> None:
        self.embedder = Embedder.from_pretrained(model_name, device=device, dtype=dtype, pooling=pooling)
        self.model = self.embedder.model
        self.batch_size = batch_size
        self.prompts_dict = dict(prompts) if prompts else None
        self.mteb_model_meta = model_meta(model_name, self.embedder, name=name, revision=revision)

    @staticmethod
    def items(batch: BatchedInput, instruction: str = "") -> list[dict]:
        """One of mteb's batches (``text`` and/or ``image`` columns, ``None`` where an item lacks
        one) → Embedder items."""
        texts, images = batch.get("text"), batch.get("image")
        n = len(texts if texts is not None else images)
        texts = texts if texts is not None else [None] * n
        images = images if images is not None else [None] * n
        return [mmeb_item(t, im, instruction) for t, im in zip(texts, images, strict=True)]

    def instruction(self, task_metadata: TaskMetadata, prompt_type: Optional[PromptType]) -> str:
        """The instruction for one side of a task (see the module docstring)."""
        if prompt_type is not None and prompt_type.value == "document":
            given = task_metadata.prompt if isinstance(task_metadata.prompt, dict) else {}
            if not (given.get("document") or (self.prompts_dict or {}).get("document")):
                return ""
        return self.get_task_instruction(task_metadata, prompt_type)

    def encode(self, inputs: DataLoader[BatchedInput], *, task_metadata: TaskMetadata, hf_split: str,
               hf_subset: str, prompt_type: Optional[PromptType] = None, **kwargs: Any) -> np.ndarray:
        instruction = self.instruction(task_metadata, prompt_type)
        size = kwargs.get("batch_size") or self.batch_size
        # batch by batch as mteb's loader decodes them: a corpus's images are never all in memory
        vecs = [self.embedder.encode(self.items(batch, instruction), batch_size=size) for batch in inputs]
        return (torch.cat(vecs) if vecs else self.embedder.encode([])).numpy()
