"""Shared helpers for the model tests: tiny checkpoints built once per test session (per
process), small synthetic samples in the decoded-sample format of pipeline.data."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

_ROOT = Path(tempfile.mkdtemp(prefix="coma-tiny-"))
atexit.register(shutil.rmtree, _ROOT, True)


@functools.lru_cache(maxsize=None)
def tiny_model_dir(family: str = "qwen2_vl") -> Path:
    from pipeline.tiny_model import make_tiny_model

    return make_tiny_model(_ROOT / family, family=family, seed=0)


def model_cfg(family: str = "qwen2_vl", **kw):
    """A float32 ModelConfig on the tiny model (K=4 keeps sequences short)."""
    from pipeline.config import LoraConfig, ModelConfig

    lora = kw.pop("lora", None) or LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0)
    base = dict(init=str(tiny_model_dir(family)), dtype="float32", num_compression_tokens=4,
                gradient_checkpointing=False, lora=lora)
    base.update(kw)
    return ModelConfig(**base)


def image(w: int, h: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def qa_samples():
    """Three qa samples with different image sizes (4, 6 and 9 visual tokens) and dialogue lengths."""
    return [
        {"__key__": "s0", "kind": "qa", "image": image(56, 56, 0), "meta": {},
         "conversations": [{"question": "What digit is shown?", "answer": "three"},
                           {"question": "Is it even?", "answer": "no, it is odd"}]},
        {"__key__": "s1", "kind": "qa", "image": image(84, 56, 1), "meta": {},
         "conversations": [{"question": "What digit is shown in the image?", "answer": "seven"}]},
        {"__key__": "s2", "kind": "qa", "image": image(84, 84, 2), "meta": {},
         "conversations": [{"question": "Which number?", "answer": "one"},
                           {"question": "How many strokes?", "answer": "a few"},
                           {"question": "Odd or even?", "answer": "odd"}]},
    ]


WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits_qa_samples(n: int = 16):
    """Real data: the first ``n`` qa records of the bundled dataset (data_prep/builtin.py:
    scikit-learn's handwritten digits rendered at 56 px, 3-turn dialogues) in
    pipeline.data's decoded-sample format — built in memory, no shards needed."""
    import io

    from PIL import Image
    from sklearn.datasets import load_digits

    from data_prep import builtin

    d = load_digits()
    train, ev = builtin.split(d.target, 0)
    out = []
    for r in builtin.manifests(d.target, train, ev, 0)["qa"][:n]:
        scan = d.images[r["meta"]["index"]]
        img = Image.open(io.BytesIO(builtin.render(scan))).convert("RGB")
        out.append({"__key__": r["key"], "kind": "qa", "image": img, "meta": r["meta"],
                    "conversations": r["conversations"]})
    return out
