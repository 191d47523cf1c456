"""The placeholder contract and the prompt templates shared by data prep, training and evaluation.

Where an image goes in a text
-----------------------------
Public datasets mark the image inside a text in different ways: MMEB writes ``<|image_1|>``,
LLaVA writes ``<image>``.  Everything this project stores (manifests, shards) uses ONE
canonical marker, :data:`IMAGE_PLACEHOLDER` (``"<image>"``):

* converters call :func:`normalize_placeholders` on every text they write;
* a side (query / positive / negative / pair) holds at most one image; its text contains the
  marker at most once.  A text with an image but no marker means "image first, then text";
  a marker with no image is removed (MMEB has a few such rows);
* the collator calls :func:`split_on_placeholder` and puts the model family's vision span
  (for Qwen-VL ``<|vision_start|><|image_pad|>…<|vision_end|>``) exactly where the marker was.

So the model sees ``[text before][image tokens][text after][C_0 … C_{K-1}]`` for an input.
"""
from __future__ import annotations

import re

IMAGE_PLACEHOLDER = "<image>"

# Markers used by public formats, mapped to the canonical one.  ``<|image_N|>`` covers MMEB
# (which only ever uses N = 1 since every side has at most one image).
_FOREIGN_MARKERS = re.compile(r"<\|image_\d+\|>|<image>|<img>|\[image\]", re.IGNORECASE)

# Default instruction appended before the compression tokens when an input has no text of its
# own (paper: "Summarize the above image in a few words.").
DEFAULT_IMAGE_INSTRUCTION = "Summarize the above image in a few words."
DEFAULT_TEXT_INSTRUCTION = "Summarize the above sentence in a few words."

# What the authors' stage-1 code puts between the image and C (``model.prompt_format: official``;
# src/data/dataset/llava_instruct_dataset.py:76-80 of Trustworthy-Information-Access/CoMa).
OFFICIAL_STAGE1_PROMPT = "\nSummarize above image and text in a few words."
OFFICIAL_STAGE1_TEXT_PROMPT = "\nSummarize above text in a few words."


def normalize_placeholders(text: str | None) -> str | None:
    """Rewrite every known image marker (``<|image_1|>``, ``<image>``, …) to :data:`IMAGE_PLACEHOLDER`
    and collapse repeats to the first occurrence.  ``None`` stays ``None``."""
    if text is None:
        return None
    out, seen = [], False
    pos = 0
    for m in _FOREIGN_MARKERS.finditer(text):
        out.append(text[pos:m.start()])
        if not seen:
            out.append(IMAGE_PLACEHOLDER)
            seen = True
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def has_placeholder(text: str | None) -> bool:
    """True when ``text`` holds the canonical marker."""
    return bool(text) and IMAGE_PLACEHOLDER in text


def has_marker(text: str | None) -> bool:
    """True when ``text`` holds any known image marker (canonical or foreign)."""
    return bool(text) and _FOREIGN_MARKERS.search(text) is not None


def strip_placeholders(text: str | None) -> str | None:
    """Remove every marker (used when a side has text but no image), tidying whitespace."""
    if text is None:
        return None
    return re.sub(r"[ \t]{2,}", " ", _FOREIGN_MARKERS.sub("", text)).strip()


def split_on_placeholder(text: str | None, has_image: bool) -> tuple[str, str]:
    """Split a side's text around its image.

    Returns ``(before, after)``: the model input is ``before + <vision span> + after`` when
    ``has_image`` and ``before + after`` otherwise.  No marker + an image = image first.
    """
    text = text or ""
    if not has_image:
        return strip_placeholders(text) or "", ""
    text = normalize_placeholders(text)
    if IMAGE_PLACEHOLDER not in text:
        return "", text.strip()
    before, after = text.split(IMAGE_PLACEHOLDER, 1)
    return before.rstrip(), after.strip()
