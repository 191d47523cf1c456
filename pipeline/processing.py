"""Tokenizer + PIL image processor + compression tokens: everything that turns text and images
into token ids for one VLM family, without torchvision.

    proc = Processor.from_pretrained("runs/tiny-qwen2vl", num_compression_tokens=32)
    ids, n_img = proc.input_ids(text="A <image> of a digit", image=pil)   # X, image span expanded
    proc.compression_ids                                                  # C's K token ids

The stock ``Qwen2VLProcessor`` imports a video processor that needs torchvision, so the
processor here is a small composition of the checkpoint's tokenizer, the PIL-only image
processor and the family adapter's prompt format.  ``save_pretrained`` writes the tokenizer
(with the compression tokens) and ``preprocessor_config.json`` beside the model.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Sequence

import torch

from pipeline.adapters import FamilyAdapter, adapter_for
from pipeline.prompts import (IMAGE_PLACEHOLDER, OFFICIAL_STAGE1_PROMPT, OFFICIAL_STAGE1_TEXT_PROMPT,
                              normalize_placeholders, split_on_placeholder)

COMPRESSION_TOKEN = "<|cmp_{i}|>"
# The authors' name for them (src/model/processor.py:32 of Trustworthy-Information-Access/CoMa):
# a tokenizer of their released checkpoints has these, and they are used as found.
RELEASED_COMPRESSION_TOKEN = "<|ctoken_pad_{i}|>"


def compression_tokens(k: int, fmt: str = COMPRESSION_TOKEN) -> list[str]:
    return [fmt.format(i=i) for i in range(k)]


def released_compression_tokens(tokenizer) -> int:
    """How many of the authors' ``<|ctoken_pad_i|>`` tokens (i = 0, 1, …) ``tokenizer`` holds,
    0 when it holds ours or none."""
    vocab = tokenizer.get_vocab()
    if COMPRESSION_TOKEN.format(i=0) in vocab:
        return 0
    k = 0
    while RELEASED_COMPRESSION_TOKEN.format(i=k) in vocab:
        k += 1
    return k


class Processor:
    """Holds ``tokenizer``, ``image_processor``, ``adapter`` and the K compression tokens."""

    def __init__(self, tokenizer, image_processor, adapter: FamilyAdapter, num_compression_tokens: int,
                 merge_size: int, image_token_id: int, vision_start_id: int, vision_end_id: int,
                 token_format: str = COMPRESSION_TOKEN):
        if num_compression_tokens < 1:
            raise ValueError(f"model.num_compression_tokens must be >= 1, got {num_compression_tokens}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.adapter = adapter
        self.merge_size = merge_size
        self.image_token_id = image_token_id
        self.vision_start_id = vision_start_id
        self.vision_end_id = vision_end_id
        self.num_compression_tokens = num_compression_tokens
        self.added_tokens = add_compression_tokens(tokenizer, num_compression_tokens, token_format)
        self.compression_ids = [tokenizer.convert_tokens_to_ids(t)
                                for t in compression_tokens(num_compression_tokens, token_format)]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._ids: dict[str, tuple[int, ...]] = {}  # many_text_ids' memo
        # Every string the tokenizer turns into one added token (<|image_pad|>, <|im_end|>, the
        # compression tokens, …): in sample text they are plain characters (see user_ids).
        added = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, added))) if added else None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, num_compression_tokens: int = 32, family: str = "auto",
                        min_pixels: Optional[int] = None, max_pixels: Optional[int] = None) -> "Processor":
        from transformers import AutoConfig, AutoTokenizer

        path = str(path)  # a local directory or a hub id (resolved by transformers, offline from its cache)
        config = AutoConfig.from_pretrained(path)
        adapter = adapter_for(config.model_type, family)
        tok = AutoTokenizer.from_pretrained(path)
        improc = adapter.image_processor(path, min_pixels, max_pixels)
        fmt = RELEASED_COMPRESSION_TOKEN if released_compression_tokens(tok) else COMPRESSION_TOKEN
        return cls(tok, improc, adapter, num_compression_tokens, adapter.merge_size(config),
                   config.image_token_id, config.vision_start_token_id, config.vision_end_token_id, fmt)

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)

    # ------------------------------------------------------------------------------- pieces
    # Token ids memoised per string: most of what the collator tokenises is the same few template
    # strings (system block, turn markers, instructions, stock questions) sample after sample,
    # and one tokenizer call costs ~75 us of Python however short the text.  Bounded; valid
    # because the vocabulary is fixed once the compression tokens are added in __init__.
    CACHE_SIZE = 1 << 15

    def text_ids(self, text: str) -> list[int]:
        return self.many_text_ids([text])[0]

    def many_text_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens added; ``""`` → ``[]``), fresh lists the
        caller may extend; the texts not seen before go through the tokenizer in one call."""
        cache = self._ids
        todo = [t for t in dict.fromkeys(texts) if t and t not in cache]
        if todo:
            if len(cache) + len(todo) > self.CACHE_SIZE:
                cache.clear()
            for t, ids in zip(todo, self.tokenizer(todo, add_special_tokens=False)["input_ids"]):
                cache[t] = tuple(ids)
        return [list(cache[t]) if t else [] for t in texts]

    def user_ids(self, text: Optional[str]) -> Optional[list[int]]:
        """Token ids of sample text (a caption, question, answer, query) when it spells an added
        token, tokenised as the characters it is; None when it spells none (the caller then
        tokenises it with its template, memoised).

        Why: the tokenizer turns ``<|image_pad|>`` or ``<|cmp_0|>`` anywhere in its input into
        that token, so a caption quoting one would add an image token without pixels (the
        vision merge fails) or a compression token outside C (the stage-1 mask raises, the
        pooled embedding silently averages the wrong positions)."""
        if not text or self._added is None or not self._added.search(text):
            return None
        return self._as_characters(text)

    def _as_characters(self, text: str) -> list[int]:
        """Token ids of ``text`` with any added-token spelling in it read as plain characters."""
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def images(self, images: Sequence) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """RGB PIL images → (pixel_values [P, C·T·p·p] float32, image_grid_thw [N, 3] long,
        visual tokens per image)."""
        out = self.image_processor(images=list(images), return_tensors="pt")
        grid = out["image_grid_thw"].long()
        n = (grid.prod(-1) // self.merge_size ** 2).tolist()
        return out["pixel_values"].float(), grid, n

    def vision_span_ids(self, n_tokens: int) -> list[int]:
        return [self.vision_start_id] + [self.image_token_id] * n_tokens + [self.vision_end_id]

    def input_ids(self, text: Optional[str], n_image_tokens: Optional[int], instruction: Optional[str] = None,
                  max_text_tokens: Optional[int] = None) -> list[int]:
        """Token ids of X: a user turn holding the text with the image span where the ``<image>``
        marker was (no marker = image first), an optional instruction, then the assistant
        header — C follows right after (``[X][C]``).  ``n_image_tokens`` None = no image;
        ``max_text_tokens``: see :meth:`cut_text`."""
        a = self.adapter
        has_image = n_image_tokens is not None
        before, after = split_on_placeholder(text, has_image)
        if max_text_tokens is not None:
            before, after = self.cut_text(before, after, max_text_tokens)
        tail = "\n".join(p for p in (after, instruction or "") if p)
        head, close = a.system_block() + a.user_open(), a.turn_close() + a.assistant_open()
        lit_before, lit_after = self.user_ids(before), self.user_ids(after)
        if lit_before is None and lit_after is None:
            ids, end = self.many_text_ids([head + before, tail + close])
        else:  # sample text spelling added tokens: templates and text tokenised apart
            rest = "\n" + instruction if after and instruction else instruction or ""
            ids, end, b, r = self.many_text_ids([head, rest + close, before, after + rest + close])
            ids += b if lit_before is None else lit_before
            end = r if lit_after is None else lit_after + end
        if has_image:
            ids += self.vision_span_ids(n_image_tokens)
        return ids + end

    def official_input_ids(self, text: Optional[str], n_image_tokens: Optional[int], stage1: bool,
                           instruction: Optional[str] = None, max_text_tokens: Optional[int] = None,
                           suffix: str = "") -> list[int]:
        """Token ids of X as the authors' code builds it (``model.prompt_format: official``;
        docs/fidelity.md has the file:line of each rule).  No chat template, no system prompt:

        * stage 1: the vision span, the sample's own text after a newline when it has one,
          then ``"\nSummarize above image and text in a few words."``;
        * stage 2 and evaluation: the raw text with the vision span where the ``<image>``
          marker was (``<|image_1|>`` in MMEB; literally, whitespace kept), or first when the
          text has no marker; ``instruction`` (``model.instruction``) after a newline if set;
          then ``suffix`` (``official_eval``: their evaluation's ``"\n"``).

        C follows directly.  With an image every text piece lies between special tokens, so
        tokenising the pieces apart gives the ids of the authors' whole-string tokenisation;
        without one the text is tokenised whole."""
        has_image = n_image_tokens is not None
        span = self.vision_span_ids(n_image_tokens) if has_image else []
        text = normalize_placeholders(text) or ""
        if stage1:
            own = text.replace(IMAGE_PLACEHOLDER, "").strip()
            prompt = OFFICIAL_STAGE1_PROMPT if has_image else OFFICIAL_STAGE1_TEXT_PROMPT
            before, after = "", ("\n" + own if own else "") + prompt
        elif has_image and IMAGE_PLACEHOLDER in text:
            before, after = text.split(IMAGE_PLACEHOLDER, 1)
        else:
            before, after = ("", text) if has_image else (text, "")
        if max_text_tokens is not None and not stage1:
            before, after = self.cut_text(before, after, max_text_tokens)
        if instruction and not stage1:
            after = after + "\n" + instruction
        after += suffix
        if not has_image:  # no special token between the pieces: one string, as theirs ("…\n" + "\n" is one token)
            before, after = before + after, ""
        b, a = (self.user_ids(x) for x in (before, after))
        tb, ta = self.many_text_ids([before if b is None else "", after if a is None else ""])
        return (tb if b is None else b) + span + (ta if a is None else a)

    def cut_text(self, before: str, after: str, max_tokens: int) -> tuple[str, str]:
        """An input's own text (``before`` and ``after`` its image) cut to at most ``max_tokens``
        tokens together, counted as each part tokenises on its own; the cut drops the end of
        the text as read (``after``'s tail first, then ``before``'s) at a token boundary.

        Why here and not a truncation of the whole sequence: that would cut the image span,
        the instruction or the compression tokens, which the model cannot do without."""
        if before.isascii() and after.isascii() and len(before) + len(after) <= max_tokens:
            return before, after  # no token is under one byte (ASCII: no normalizer makes it longer)
        enc = self.tokenizer([before, after], add_special_tokens=False, split_special_tokens=True,
                             return_offsets_mapping=True)
        (ids_b, ids_a), (off_b, off_a) = enc["input_ids"], enc["offset_mapping"]
        if len(ids_b) + len(ids_a) <= max_tokens:
            return before, after
        if len(ids_b) >= max_tokens:
            return self._token_prefix(before, off_b, max_tokens), ""
        return before, self._token_prefix(after, off_a, max_tokens - len(ids_b))

    def _token_prefix(self, text: str, offsets: Sequence[tuple[int, int]], n: int) -> str:
        """The longest prefix of ``text`` ending where one of its first ``n`` tokens ends that
        tokenises to at most ``n`` tokens (re-tokenising a cut word can take one more)."""
        for k in range(n, 0, -1):
            cut = text[: offsets[k - 1][1]]
            if len(self._as_characters(cut)) <= n:
                return cut
        return ""

    def dialogue_pieces(self, conversations: Sequence[dict], loss_on: str = "answer", head: bool = True
                        ) -> list[tuple[list[int], list[bool]]]:
        """D = ``Q_1 A_1 … Q_t A_t`` (the ChatML turns after C) as ``[head, turn_1, …, turn_t]``
        pieces of (token ids, per-token "is a target" flags): answers (+ their end-of-turn token)
        for ``loss_on="answer"``, every token for ``"all"``.  Each turn is tokenised on its own,
        so D of the first t turns is the concatenation of the first t + 1 pieces.  ``head``
        False (the official format: C is not inside an assistant turn): the head piece is empty."""
        a = self.adapter
        other = loss_on == "all"
        for i, turn in enumerate(conversations):
            if not turn.get("question") or turn.get("answer") is None:
                raise ValueError(f"conversation turn {i} needs a non-empty 'question' and an 'answer', got {turn!r}")
        # one tokenizer call for the whole dialogue: [head, answer close, newline, q_1, a_1, …]
        ids = self.many_text_ids(
            [a.turn_close(), a.turn_close().rstrip("\n"), "\n"]
            + [s for t in conversations
               for s in (a.user_open() + t["question"] + a.turn_close() + a.assistant_open(), str(t["answer"]))])
        first, answer_close, nl = ids[:3]  # the head closes the assistant turn that C occupies
        first = first if head else []
        pieces = [(first, [other] * len(first))]
        for t, q_ids, a_ids in zip(conversations, ids[3::2], ids[4::2]):
            q_lit, a_lit = self.user_ids(t["question"]), self.user_ids(str(t["answer"]))
            if q_lit is not None:  # a question spelling added tokens (see user_ids)
                q_open, q_close = self.many_text_ids([a.user_open(), a.turn_close() + a.assistant_open()])
                q_ids = q_open + q_lit + q_close
            if a_lit is not None:
                a_ids = a_lit
            a_ids += answer_close
            pieces.append((q_ids + a_ids + nl, [other] * len(q_ids) + [True] * len(a_ids) + [other] * len(nl)))
        return pieces


def add_compression_tokens(tokenizer, k: int, fmt: str = COMPRESSION_TOKEN) -> int:
    """Add ``<|cmp_0|>..<|cmp_{k-1}|>`` (or ``fmt``'s names) as special tokens where missing;
    returns how many were added (0 for a checkpoint exported after a previous stage)."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in compression_tokens(k, fmt) if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return len(missing)
