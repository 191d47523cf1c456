"""Collation: sequence layout, answer-only label masking across turns and padding, the image
where the <image> marker is, contrastive batches, bad input."""
import pytest
import torch

from pipeline.collate import IGNORE_INDEX, Collator, to_device
from pipeline.processing import Processor
from tests.tiny_models import image, model_cfg, qa_samples, tiny_model_dir


@pytest.fixture(scope="module")
def proc():
    return Processor.from_pretrained(tiny_model_dir("qwen2_vl"), num_compression_tokens=4)


def _decode(proc, ids):
    return proc.tokenizer.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_answer_only_labels_across_turns_and_padding(proc, padding_side):
    cfg = model_cfg()
    samples = qa_samples()
    b = Collator(proc, cfg, kind="qa", padding_side=padding_side)(samples)
    assert b["labels"].shape == b["input_ids"].shape
    for i, s in enumerate(samples):
        lab = b["labels"][i]
        ids = b["input_ids"][i]
        tgt = lab != IGNORE_INDEX
        assert torch.equal(lab[tgt], ids[tgt])                       # unshifted copies of the inputs
        assert not tgt[b["attention_mask"][i] == 0].any()            # never on padding
        # the targets, decoded, are exactly the answers each followed by the end-of-turn token
        expect = "".join(t["answer"] + "<|im_end|>" for t in s["conversations"])
        assert _decode(proc, ids[tgt].tolist()) == expect
        # and they all come after C
        cpos = torch.isin(ids, torch.tensor(proc.compression_ids)).nonzero().flatten()
        assert len(cpos) == 4 and tgt.nonzero().min() > cpos.max()
        # one contiguous target run per turn
        runs = int(((tgt[1:].int() - tgt[:-1].int()) == 1).sum()) + int(tgt[0])
        assert runs == len(s["conversations"])


def test_loss_on_every_token_after_c(proc):
    cfg = model_cfg(stage1_loss="all")
    b = Collator(proc, cfg, kind="qa")(qa_samples())
    for i in range(3):
        ids, tgt, am = b["input_ids"][i], b["labels"][i] != IGNORE_INDEX, b["attention_mask"][i].bool()
        c_last = int(torch.isin(ids, torch.tensor(proc.compression_ids)).nonzero().max())
        assert not tgt[: c_last + 1].any()
        assert tgt[c_last + 1:][am[c_last + 1:]].all()


def test_input_layout_and_image_at_marker(proc):
    cfg = model_cfg()
    col = Collator(proc, cfg, kind="mmeb")
    b = col.encode([{"text": "before <image> after", "image": image(56, 56)},
                    {"text": "only text", "image": None},
                    {"text": None, "image": image(84, 56, 3)}])
    texts = [_decode(proc, ids[am.bool()].tolist()) for ids, am in zip(b["input_ids"], b["attention_mask"])]
    cmp = "".join(f"<|cmp_{i}|>" for i in range(4))
    assert texts[0].endswith("<|im_start|>assistant\n" + cmp)
    assert "user\nbefore<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>after" in texts[0]
    assert "<|image_pad|>" not in texts[1] and "only text" in texts[1]
    # no text of its own: the default instruction goes before C
    assert "<|vision_end|>Summarize the above image in a few words." in texts[2]
    assert b["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6]]
    assert int(b["mm_token_type_ids"].sum()) == 4 + 6 == int((b["input_ids"] == proc.image_token_id).sum())
    assert b["pixel_values"].shape[0] == 16 + 24


def test_contrastive_batch_positives_then_negatives(proc):
    cfg = model_cfg()
    s = lambda k, q, p, negs: {"__key__": k, "kind": "mmeb", "task": "t", "meta": {},  # noqa: E731
                               "query": q, "positive": p, "negatives": negs}
    samples = [s("a", {"text": "<image> which digit?", "image": image(56, 56)}, {"text": "three", "image": None},
                 [{"text": "five", "image": None}, {"text": "six", "image": None}]),
               s("b", {"text": "find the image of a one", "image": None}, {"text": None, "image": image(56, 56, 1)},
                 [{"text": "seven", "image": None}])]
    b = Collator(proc, cfg, kind="mmeb")(samples)
    assert b["num_queries"] == 2
    c = b["candidates"]
    texts = [_decode(proc, ids[am.bool()].tolist()) for ids, am in zip(c["input_ids"], c["attention_mask"])]
    assert "three" in texts[0] and "<|image_pad|>" in texts[1] and ["five" in texts[2], "six" in texts[3],
                                                                      "seven" in texts[4]] == [True] * 3
    b1 = Collator(proc, cfg, kind="mmeb", max_negatives=1)(samples)
    assert b1["candidates"]["input_ids"].shape[0] == 4
    # a side with no image at all carries no pixel tensors (the model's dummy-vision guard runs instead)
    text_only = Collator(proc, cfg, kind="mmeb").encode([{"text": "a", "image": None}])
    assert "pixel_values" not in text_only
    moved = to_device(b, "cpu", torch.float64)
    assert moved["query"]["pixel_values"].dtype == torch.float64 and moved["query"]["input_ids"].dtype == torch.long


def test_pair_kind_both_modes(proc):
    cfg = model_cfg()
    pairs = [{"__key__": "p", "kind": "pair", "image": image(56, 56), "text": "a handwritten three", "meta": {}}]
    st1 = Collator(proc, cfg, kind="pair", mode="stage1")(pairs)
    tgt = st1["labels"][0] != IGNORE_INDEX
    assert _decode(proc, st1["input_ids"][0][tgt].tolist()) == "a handwritten three<|im_end|>"
    con = Collator(proc, cfg, kind="pair", mode="contrastive")(pairs)
    assert "pixel_values" in con["query"] and "pixel_values" not in con["candidates"]


def test_bad_input_is_named(proc):
    cfg = model_cfg()
    with pytest.raises(ValueError, match="mode 'contrastive' does not apply to kind 'qa'"):
        Collator(proc, cfg, kind="qa", mode="contrastive")
    bad = qa_samples()[:1]
    bad[0]["conversations"] = [{"question": "", "answer": "x"}]
    with pytest.raises(ValueError, match="sample 's0'.*turn 0"):
        Collator(proc, cfg, kind="qa")(bad)
    with pytest.raises(ValueError, match="kind 'pair'"):
        Collator(proc, cfg, kind="qa")([{"__key__": "z", "kind": "pair", "image": image(8, 8), "text": "t"}])
    with pytest.raises(ValueError, match="K=4 .*num_compression_tokens=8"):
        Collator(proc, model_cfg(num_compression_tokens=8), kind="qa")


def test_max_length_drops_trailing_turns(proc):
    samples = qa_samples()[2:]                       # 3 turns
    full = Collator(proc, model_cfg(), kind="qa")(samples)
    n_full = int(full["attention_mask"].sum())
    one_less = Collator(proc, model_cfg(max_length=n_full - 1), kind="qa")(samples)
    ids = one_less["input_ids"][0]
    tgt = one_less["labels"][0] != IGNORE_INDEX
    assert int(one_less["attention_mask"].sum()) < n_full
    assert _decode(proc, ids[tgt].tolist()) == "one<|im_end|>a few<|im_end|>"   # whole turns kept
    x_len = int(torch.isin(ids, torch.tensor(proc.compression_ids)).nonzero().max()) + 1
    cut = Collator(proc, model_cfg(max_length=x_len + 12), kind="qa")(samples)
    assert int(cut["attention_mask"].sum()) == x_len + 12                # first turn cut at the limit
    with pytest.raises(ValueError, match="model.max_length=10"):
        Collator(proc, model_cfg(max_length=10), kind="qa")(samples)


def _n_tokens(proc, text):
    return len(proc.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def test_cut_text_keeps_at_most_n_tokens_from_the_start(proc):
    long = " ".join(f"word{i} 漢字🙂 e\u0301" for i in range(60))  # multi-token chars: cuts must not overshoot
    assert proc.cut_text("short", "text", 16) == ("short", "text")        # under the cap: untouched
    for n in (1, 2, 7, 33, 100):
        before, after = proc.cut_text(long, "tail", n)
        assert after == "" and long.startswith(before) and _n_tokens(proc, before) <= n
        assert _n_tokens(proc, before) >= n - 2                          # and not cut much shorter
    head = "a caption before the image"
    nb = _n_tokens(proc, head)
    before, after = proc.cut_text(head, long, nb + 10)                   # the end goes first
    assert before == head and long.startswith(after) and nb + _n_tokens(proc, after) <= nb + 10
    assert after and _n_tokens(proc, after) >= 8
    # Qwen2/2.5-VL's tokenizer normalises to NFC, which can make a text longer than its bytes
    from tokenizers import normalizers

    nfc = Processor.from_pretrained(tiny_model_dir("qwen2_vl"), num_compression_tokens=4)
    nfc.tokenizer.backend_tokenizer.normalizer = normalizers.NFC()
    for text in ("\U0001D15E" * 3, "\u0958" * 4):                        # 12 bytes each, 24 after NFC
        cut, _ = nfc.cut_text(text, "", 12)
        assert text.startswith(cut) and _n_tokens(nfc, cut) <= 12 < _n_tokens(nfc, text)


def test_max_text_tokens_cuts_only_the_text(proc):
    """The cap shortens an input's own text; the image span, the instruction and C stay whole,
    and a text under the cap gives the same ids as no cap."""
    long = "a very long passage about a handwritten digit " * 40
    items = [{"text": long + "<image>" + long, "image": image(56, 56)}, {"text": long, "image": None},
             {"text": "short query", "image": None}]
    full = Collator(proc, model_cfg(instruction="Find the match."), kind="mmeb").encode(items)
    cut = Collator(proc, model_cfg(instruction="Find the match.", max_text_tokens=24), kind="mmeb").encode(items)
    lens = cut["attention_mask"].sum(1)
    assert (lens < full["attention_mask"].sum(1))[:2].all() and lens[2] == full["attention_mask"][2].sum()
    assert torch.equal(cut["input_ids"][2, : lens[2]], full["input_ids"][2, : lens[2]])
    instr = proc.text_ids("Find the match.")
    for i in range(3):
        ids = cut["input_ids"][i, : lens[i]].tolist()
        assert ids[-4:] == proc.compression_ids                          # C last (right padding)
        assert ids.count(proc.image_token_id) == full["input_ids"][i].tolist().count(proc.image_token_id)
        assert any(ids[j:j + len(instr)] == instr for j in range(len(ids)))
    # the text itself: at most 24 tokens (+1 where the template's newline merges with it)
    n_plain = int(Collator(proc, model_cfg(instruction="Find the match."), kind="mmeb").encode(
        [{"text": "x", "image": None}])["attention_mask"].sum()) - 1
    assert int(lens[1]) <= n_plain + 24 + 1
    with pytest.raises(ValueError, match="model.max_text_tokens must be >= 1"):
        Collator(proc, model_cfg(max_text_tokens=0), kind="mmeb")


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


class _Batches(torch.utils.data.IterableDataset):
    """Collated stage-1 and contrastive batches, made inside the DataLoader worker."""

    def __init__(self, proc, packed):
        self.proc, self.packed = proc, packed

    def __iter__(self):
        from pipeline.collate import PackedCollate

        cfg = model_cfg()
        qa, mm = Collator(self.proc, cfg, kind="qa"), Collator(self.proc, cfg, kind="mmeb")
        mmeb = [{"__key__": "m", "kind": "mmeb", "task": "t", "meta": {},
                 "query": {"text": "<image> which?", "image": image(56, 84)}, "positive": {"text": "3", "image": None},
                 "negatives": [{"text": None, "image": image(56, 56, 4)}]}]
        for make in (lambda s: qa(s), lambda s: [mm(mmeb), mm(mmeb)]):   # one batch; a list of chunks
            yield (PackedCollate(make) if self.packed else make)(qa_samples())


@pytest.mark.parametrize("inline", [True, False])
def test_packed_batches_cross_worker_processes_unchanged(proc, inline, monkeypatch):
    """Packed (one buffer per batch) gives back the exact batch, dtypes and nesting included,
    both by value (small) and through shared memory (large), from real worker processes."""
    from pipeline.collate import Packed

    monkeypatch.setattr(Packed, "INLINE_BYTES", 1 << 30 if inline else 0)  # workers fork: they see it
    direct = list(_Batches(proc, packed=False))
    dl = torch.utils.data.DataLoader(_Batches(proc, packed=True), batch_size=None, num_workers=1)
    got = list(dl)
    assert all(isinstance(p, Packed) for p in got)
    assert isinstance(got[0].buf, torch.Tensor) is not inline
    for want, p in zip(direct, got):
        back = p.unpack()
        assert _same(want, back)
        # every tensor of the batch lives in one buffer, each view aligned for its dtype
        leaves = list(back.values()) if isinstance(back, dict) else [t for c in back for s in ("query", "candidates")
                                                                      for t in c[s].values()]
        assert len({t.untyped_storage().data_ptr() for t in leaves}) == 1
        assert all(t.data_ptr() % t.element_size() == 0 for t in leaves)


def test_packed_odd_tensors():
    from pipeline.collate import Packed

    base = torch.arange(24, dtype=torch.float64).view(4, 6)
    batch = {"t": base.t(), "e": torch.empty(0, 3, dtype=torch.int32), "b": torch.tensor([True, False, True]),
             "h": torch.tensor([1.5], dtype=torch.float16), "n": 3, "s": "key", "x": (torch.tensor(7), [None])}
    assert _same(batch, Packed(batch).unpack())


def test_cached_tokenisation_matches_the_tokenizer(proc):
    texts = ["What digit is shown?", "", "three", "What digit is shown?", "<|im_start|>user\nx<|im_end|>\n"]
    want = [proc.tokenizer(t, add_special_tokens=False)["input_ids"] if t else [] for t in texts]
    assert proc.many_text_ids(texts) == want
    first = proc.text_ids("three")
    first.append(-1)                                  # the caller owns the list it gets
    assert proc.text_ids("three") == want[2] and proc.many_text_ids(texts) == want


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_pixels_in_the_model_dtype_change_nothing_but_the_bytes(proc, dtype):
    """Training collates pixel_values in the model's dtype (pipeline.train.pixel_dtype): half the
    bytes through the worker pipe, pinned memory and the copy to the GPU.  The vision tower
    casts them to that dtype first thing, so a 16-bit model's stage-1 loss and embeddings are
    bit-identical to those from float32 pixels."""
    from pipeline.model import DTYPES, load_model

    cfg = model_cfg(dtype=dtype)
    model = load_model(cfg, for_training=False)
    samples = qa_samples()
    wide = Collator(proc, cfg, kind="qa")(samples)
    narrow = Collator(proc, cfg, kind="qa", pixel_dtype=DTYPES[dtype])(samples)
    assert wide["pixel_values"].dtype == torch.float32 and narrow["pixel_values"].dtype == DTYPES[dtype]
    assert narrow["pixel_values"].nbytes * 2 == wide["pixel_values"].nbytes
    with torch.no_grad():
        assert torch.equal(model(**wide).loss, model(**narrow).loss)
        side = {k: v for k, v in narrow.items() if k != "labels"}
        side_wide = {k: v for k, v in wide.items() if k != "labels"}
        assert torch.equal(model.embed(**side), model.embed(**side_wide))


def test_text_spelling_special_tokens_stays_text(proc):
    """A caption, question or answer that quotes ``<|image_pad|>``, ``<|cmp_0|>`` or ``<|im_end|>``
    is tokenised as those characters: exactly K compression tokens in one run (the stage-1 mask
    finds its layout), as many image tokens as the pixels make, the quoted text intact."""
    from pipeline.masks import find_rows

    cfg = model_cfg()
    quoted = "the prompt was <|vision_start|><|image_pad|><|vision_end|> then <|cmp_0|><|im_end|>"
    samples = qa_samples()
    samples[0]["conversations"][0] = {"question": "What does <|cmp_1|> mean?", "answer": quoted}
    b = Collator(proc, cfg, kind="qa")(samples)
    cids = torch.tensor(proc.compression_ids)
    assert (torch.isin(b["input_ids"], cids).sum(-1) == 4).all()
    find_rows(b["input_ids"], b["attention_mask"], cids)                      # raised before
    assert int(b["mm_token_type_ids"].sum()) == int((b["image_grid_thw"].prod(-1) // 4).sum())
    tgt = b["labels"][0] != IGNORE_INDEX
    assert _decode(proc, b["input_ids"][0][tgt].tolist()) == quoted + "<|im_end|>" + "no, it is odd<|im_end|>"

    enc = Collator(proc, cfg, kind="mmeb").encode([{"text": "caption <|cmp_2|> <|image_pad|>", "image": None},
                                                    {"text": "<|image_pad|> left of <image> right", "image": image(56, 56)}])
    assert (torch.isin(enc["input_ids"], cids).sum(-1) == 4).all()
    assert int(enc["mm_token_type_ids"].sum()) == int((enc["image_grid_thw"].prod(-1) // 4).sum()) == 4
    # plain text is tokenised exactly as before (one memoised call with its template)
    a = proc.adapter
    head, close = proc.many_text_ids([a.system_block() + a.user_open() + "a plain caption",
                                      a.turn_close() + a.assistant_open()])
    assert proc.input_ids("a plain caption", None) == head + close


def _authors_ids(proc, text: str) -> list[int]:
    """What the authors' processor does with a finished input string: one tokenizer call."""
    return proc.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_official_format_stage1_token_for_token(proc):
    """model.prompt_format=official, stage 1: the string the authors' code builds (image span,
    "\\nSummarize above image and text in a few words.", C, ChatML turns without a system turn;
    llava_instruct_dataset.py:10-38,76-80, train_collator.py:182-205, processor.py:78-79),
    tokenised as their processor does, equals our ids; with stage1_loss=all the labels are every
    token from the first <|im_start|> after C to the end (processor.py:288-306)."""
    cfg = model_cfg(prompt_format="official", stage1_loss="all")
    conv = [{"question": "What digit is it?", "answer": "A seven."}, {"question": "Colour?", "answer": "Black"}]
    img = image(56, 56)
    b = Collator(proc, cfg, kind="qa")([{"__key__": "k", "kind": "qa", "image": img, "conversations": conv}])
    n = int(b["image_grid_thw"].prod(-1)[0]) // proc.merge_size ** 2
    x = ("<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>" + "\nSummarize above image and text in a few words."
         + "".join(proc.tokenizer.convert_ids_to_tokens(proc.compression_ids)))
    d = "".join(f"<|im_start|>user\n{t['question']}<|im_end|>\n<|im_start|>assistant\n{t['answer']}<|im_end|>\n"
                for t in conv)
    assert b["input_ids"][0].tolist() == _authors_ids(proc, x + d)
    n_x = len(_authors_ids(proc, x))
    assert (b["labels"][0][:n_x] == IGNORE_INDEX).all() and (b["labels"][0][n_x:] == b["input_ids"][0][n_x:]).all()


def test_official_format_stage2_token_for_token(proc):
    """Stage 2 / evaluation, official: the raw MMEB text with the vision span where <|image_1|>
    was (whitespace kept) and C appended; no template, no default instruction
    (mmeb_dataset.py:61-64)."""
    cfg = model_cfg(prompt_format="official")
    c = "".join(proc.tokenizer.convert_ids_to_tokens(proc.compression_ids))
    query = "<image> Represent the given image with the following question: What is in the image?"
    b = Collator(proc, cfg, kind="mmeb").encode([{"text": query, "image": image(56, 56)},
                                                  {"text": "A photo of a cat", "image": None}])
    n = int(b["image_grid_thw"].prod(-1)[0]) // proc.merge_size ** 2
    q = ("<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"
         + " Represent the given image with the following question: What is in the image?" + c)
    rows = [r[m.bool()].tolist() for r, m in zip(b["input_ids"], b["attention_mask"])]
    assert rows == [_authors_ids(proc, q), _authors_ids(proc, "A photo of a cat" + c)]
