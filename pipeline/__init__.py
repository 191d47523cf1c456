"""CoMa: Compression-then-Matching multimodal embedding training (library side).

The library works without the trainer: ``pipeline.Embedder`` loads an exported model and
encodes text, images or both.  The training harness lives in ``pipeline.engine`` /
``pipeline.train`` and is driven by the thin scripts in ``launch/``.
"""
__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing pipeline must not import torch/transformers
    if name == "Embedder":
        from pipeline.embedder import Embedder

        return Embedder
    raise AttributeError(name)
