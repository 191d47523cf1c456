"""Retrieval evaluation of an embedding model on ``mmeb``-kind samples.

    from pipeline import Embedder
    from pipeline.evaluate import evaluate, format_table
    emb = Embedder.from_pretrained("runs/demo/export")
    results = evaluate(samples, lambda items: emb.encode(items, batch_size=32))
    print(format_table(results))

The evaluator is written against a plain ``encode(items) -> Tensor [n, D]`` callable (items are
dicts with ``"text"`` and/or ``"image"``), so it works with :class:`pipeline.Embedder`, any other
model, or a deterministic fake encoder in the tests.

Protocol
--------
* Every query is scored against a candidate list by cosine similarity.
* **Candidate mode**, decided per query and reported per task:
  ``own``  = the sample's own positive + its negatives (MMEB's protocol, used when the sample
  has negatives); ``pool`` = every distinct positive of the query's task (used when the sample
  has no negatives; e.g. a classification task whose positives are the class names).
* Metrics per task, then the unweighted mean over tasks ("overall", as MMEB averages datasets):
  Precision@1 (MMEB's metric: the correct candidate ranks first; with one relevant candidate it
  equals Recall@1), Recall@5/10 (the positive ranks in the top k) and MRR (mean of 1/rank).
* **Ties count against the positive** (rank = 1 + number of other candidates scoring >= it), so a
  collapsed model that embeds everything identically scores 0, not 1.  MMEB's reference code
  takes ``argmax`` with the positive listed first, i.e. resolves ties in the positive's favour;
  :mod:`pipeline.mmeb` follows MMEB exactly (``ties="first"``).

Identical inputs (same text, same image pixels) are embedded once, whichever side they are on.
"""
from __future__ import annotations

import hashlib
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

Encode = Callable[[list], torch.Tensor]
DEFAULT_KS = (1, 5, 10)


# ------------------------------------------------------------------------------ input tables
def image_fingerprint(image) -> Optional[str]:
    """A content hash of a PIL image (mode, size and pixels) or of a path string; None for None."""
    if image is None:
        return None
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        return "path:" + str(image)
    h = hashlib.sha1()
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def side_item(side: dict, role: str) -> dict:
    """A sample side ``{"text", "image"}`` → an encoder item with only the present keys, and its
    role (``query`` | ``candidate``; see :meth:`pipeline.embedder.Embedder.encode`)."""
    item = {}
    if side.get("text") is not None:
        item["text"] = side["text"]
    if side.get("image") is not None:
        item["image"] = side["image"]
    if not item:
        raise ValueError("a sample side has neither text nor image")
    return {**item, "role": role}


class ItemTable:
    """Deduplicates encoder inputs: ``add(item) -> row``; identical inputs share a row."""

    def __init__(self):
        self.items: list[dict] = []
        self._rows: dict[tuple, int] = {}

    def add(self, item: dict) -> int:
        key = (item.get("text"), image_fingerprint(item.get("image")), item.get("role"), item.get("newline"))
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = len(self.items)
            self.items.append(item)
        return row

    def __len__(self) -> int:
        return len(self.items)


@dataclass
class QuerySpec:
    """One query: its row in the item table, the rows of its candidates, where the positive is."""

    task: str
    key: str
    query_row: int
    candidate_rows: list[int] = field(default_factory=list)
    positive_at: int = 0
    mode: str = "own"  # "own" | "pool"


def build_queries(samples: Iterable[dict]) -> tuple[ItemTable, list[QuerySpec]]:
    """Decoded ``mmeb`` samples (see pipeline.data) → (item table, one QuerySpec per sample).

    Own mode when the sample has at least one negative, pool mode otherwise (see module doc).
    A negative identical to the sample's positive is dropped: it would compete with itself.
    """
    table = ItemTable()
    specs: list[QuerySpec] = []
    pool: dict[str, list[int]] = defaultdict(list)   # task -> distinct positive rows, first-seen order
    pool_seen: dict[str, set] = defaultdict(set)
    for s in samples:
        if s.get("kind", "mmeb") != "mmeb":
            raise ValueError(f"sample {s.get('__key__')!r} is of kind {s.get('kind')!r}; evaluation "
                             "needs 'mmeb' samples (query / positive / negatives)")
        task = s.get("task") or "default"
        key = s.get("__key__", str(len(specs)))
        q = table.add(side_item(s["query"], "query"))
        p = table.add(side_item(s["positive"], "candidate"))
        if p not in pool_seen[task]:
            pool_seen[task].add(p)
            pool[task].append(p)
        negs = [r for r in (table.add(side_item(n, "candidate")) for n in (s.get("negatives") or [])) if r != p]
        if negs:
            specs.append(QuerySpec(task, key, q, [p] + list(dict.fromkeys(negs)), 0, "own"))
        else:
            specs.append(QuerySpec(task, key, q, [p], 0, "pool"))
    for spec in specs:
        if spec.mode == "pool":
            p = spec.candidate_rows[0]
            spec.candidate_rows = pool[spec.task]
            spec.positive_at = spec.candidate_rows.index(p)
    return table, specs


# ------------------------------------------------------------------------------------ maths
@torch.no_grad()
def embed_items(encode: Encode, items: Sequence[dict], batch_size: int = 32,
                desc: str = "embedding", progress: bool = True) -> torch.Tensor:
    """Encode ``items`` in chunks of ``batch_size`` with a tqdm bar.

    Returns float32 [len(items), D], L2-normalised (cosine similarity = dot product) whatever
    the encoder returns.
    """
    if len(items) == 0:
        raise ValueError("nothing to embed")
    out = []
    bar = tqdm(total=len(items), desc=desc, unit="item", disable=not progress, dynamic_ncols=True)
    for i in range(0, len(items), batch_size):
        chunk = list(items[i:i + batch_size])
        e = torch.as_tensor(encode(chunk))
        if e.ndim != 2 or e.shape[0] != len(chunk):
            raise ValueError(f"encode() returned shape {tuple(e.shape)} for {len(chunk)} items; "
                             "expected [n, D]")
        out.append(e.detach().float().cpu())
        bar.update(len(chunk))
    bar.close()
    return F.normalize(torch.cat(out), dim=-1)


def rank_of_positive(scores: torch.Tensor, positive_at: int, ties: str = "pessimistic") -> int:
    """0-based rank of ``scores[positive_at]`` among ``scores`` [M] (higher = better).

    ``ties="pessimistic"``: every other candidate scoring >= the positive ranks above it.
    ``ties="first"``: only strictly higher scores rank above it (= ``argmax`` with the positive
    first in the list, MMEB's reference behaviour).
    """
    s = scores[positive_at]
    others = torch.cat([scores[:positive_at], scores[positive_at + 1:]])
    if ties == "pessimistic":
        return int((others >= s).sum())
    if ties == "first":
        return int((others > s).sum())
    raise ValueError(f"ties must be 'pessimistic' or 'first', got {ties!r}")


def retrieval_metrics(ranks: Sequence[int], ks: Sequence[int] = DEFAULT_KS) -> dict:
    """0-based ranks of the positive → {"n", "precision@1", "recall@k"…, "mrr"} (fractions)."""
    n = len(ranks)
    if n == 0:
        raise ValueError("no queries to score")
    r = torch.as_tensor(list(ranks), dtype=torch.float64)
    out = {"n": n, "precision@1": float((r == 0).double().mean())}
    for k in ks:
        out[f"recall@{k}"] = float((r < k).double().mean())
    out["mrr"] = float((1.0 / (r + 1.0)).mean())
    return out


def score_queries(emb: torch.Tensor, specs: Sequence[QuerySpec], ties: str = "pessimistic"
                  ) -> tuple[list[int], list[int]]:
    """Score every query against its candidates.

    ``emb``: float32 [rows, D], L2-normalised embeddings of the item table.
    Returns (0-based rank of the positive, candidate index of the top-scoring candidate) per query.
    """
    ranks, preds = [], []
    for spec in specs:
        cand = emb[torch.as_tensor(spec.candidate_rows)]      # [M, D]
        scores = cand @ emb[spec.query_row]                   # [M]
        ranks.append(rank_of_positive(scores, spec.positive_at, ties))
        preds.append(int(torch.argmax(scores)))
    return ranks, preds


def summarize(specs: Sequence[QuerySpec], ranks: Sequence[int], ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Per-task metrics + candidate mode, and the unweighted mean over tasks as ``overall``."""
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, spec in enumerate(specs):
        by_task[spec.task].append(i)
    tasks = {}
    for task in sorted(by_task):
        idx = by_task[task]
        m = retrieval_metrics([ranks[i] for i in idx], ks)
        n_own = sum(specs[i].mode == "own" for i in idx)
        n_pool = len(idx) - n_own
        m["candidate_mode"] = "own" if n_pool == 0 else "pool" if n_own == 0 else "mixed"
        m["queries_own_candidates"] = n_own
        m["queries_pool_candidates"] = n_pool
        m["mean_candidates"] = sum(len(specs[i].candidate_rows) for i in idx) / len(idx)
        tasks[task] = m
    metric_keys = ["precision@1"] + [f"recall@{k}" for k in ks] + ["mrr"]
    overall = {"tasks": len(tasks), "n": len(specs)}
    for k in metric_keys:
        overall[k] = sum(t[k] for t in tasks.values()) / len(tasks)
    return {"tasks": tasks, "overall": overall}


CANDIDATE_NOTE = ("candidates per query: 'own' = the sample's positive + its negatives; 'pool' = every "
                  "distinct positive of the query's task (used when a sample has no negatives)")


def evaluate(samples: Iterable[dict], encode: Encode, batch_size: int = 32,
             ks: Sequence[int] = DEFAULT_KS, ties: str = "pessimistic", progress: bool = True) -> dict:
    """Embed and score decoded ``mmeb`` samples.  Returns a JSON-ready dict::

        {"tasks": {task: {"n", "precision@1", "recall@1", "recall@5", "recall@10", "mrr",
                          "candidate_mode", "mean_candidates", …}},
         "overall": {...mean over tasks...}, "candidates": CANDIDATE_NOTE, "ties": ties,
         "predictions": [{"key", "task", "rank", "pred"}]}

    All metrics are fractions in [0, 1]; ``rank`` is 0-based; ``pred`` indexes the candidate list.
    """
    table, specs = build_queries(samples)
    if not specs:
        raise ValueError("no samples to evaluate")
    emb = embed_items(encode, table.items, batch_size, desc="embedding queries+candidates", progress=progress)
    ranks, preds = score_queries(emb, specs, ties)
    out = summarize(specs, ranks, ks)
    out["candidates"] = CANDIDATE_NOTE
    out["ties"] = ties
    out["distinct_inputs_embedded"] = len(table)
    out["predictions"] = [{"key": s.key, "task": s.task, "rank": r, "pred": p}
                          for s, r, p in zip(specs, ranks, preds)]
    return out


# ------------------------------------------------------------------------------ I/O helpers
def _check_shards_exist(spec: str) -> None:
    """The training loader treats an unreadable shard as empty (a run must not die for one); an
    evaluation must not quietly score fewer queries, so a missing local shard is an error here."""
    import braceexpand

    if os.path.isdir(spec):
        return
    urls = [u for part in spec.split("::") for u in braceexpand.braceexpand(part.strip())]
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards of {spec!r} do not exist, e.g. {missing[0]}; "
                                "check the pattern (brace ranges are inclusive) or run data_prep/shard.py")


def read_mmeb_shards(spec: str, max_samples: Optional[int] = None, batch_size: int = 64) -> list[dict]:
    """Every ``mmeb`` sample of the shards (a brace pattern, a .tar, a ``::`` list or a shard
    folder), read once in shard order by the project's loader (:func:`pipeline.data.build_loader`
    in its evaluation setting, in this process: no shuffle, no dropped or padded samples).

    Corrupt samples are skipped by the loader; their number is logged as a warning, since the
    scores then cover fewer queries.  Returns decoded samples as pipeline.data documents them.
    """
    from pipeline.config import Config, DataConfig, DataSource
    from pipeline.data import build_loader
    from pipeline.data.plan import KindMismatch

    hint = "evaluation needs shards written by data_prep/shard.py --kind mmeb"
    _check_shards_exist(spec)
    data = DataConfig(kind="mmeb", sources=[DataSource(shards=p.strip()) for p in spec.split("::")], workers=0)
    try:
        loader = build_loader(Config(data=data), 0, 1, batch_size=batch_size, evaluation=True)
    except KindMismatch as e:
        raise ValueError(f"{e}: {hint}") from None
    out: list[dict] = []
    try:
        for batch in loader:
            out.extend(s for s in batch if not s["__pad__"])
            if max_samples and len(out) >= max_samples:
                out = out[:max_samples]
                break
    except RuntimeError as e:  # the loader found nothing decodable as mmeb (e.g. qa or pair shards)
        raise ValueError(f"{spec}: {e}; {hint}") from None
    bad = {k: v for k, v in loader.metrics().items() if v and "corrupt" in k}
    if bad:
        import warnings

        warnings.warn(f"{spec}: the loader skipped corrupt data {bad}; scores cover the remaining samples")
    if not out:
        raise ValueError(f"the shards of {spec!r} hold no samples")
    return out


def load_encoder(model_dir: str, device: Optional[str] = None, batch_size: int = 32,
                 pooling: Optional[str] = None) -> Encode:
    """``encode(items) -> float32 [n, D]`` backed by :class:`pipeline.Embedder` on an exported model
    (``pooling``: override the model's, e.g. ``mean`` for the released weights' training pooling)."""
    from pipeline.embedder import Embedder

    emb = Embedder.from_pretrained(model_dir, **({"device": device} if device else {}), pooling=pooling)

    def encode(items: list) -> torch.Tensor:
        return emb.encode(items, batch_size=batch_size)

    return encode


# ------------------------------------------------------------------------- compression probe
@torch.no_grad()
def compression_probe(model_dir: str, samples: Sequence[dict], task: Optional[str] = None,
                      max_samples: Optional[int] = 300, batch_size: int = 32, device: str = "cpu",
                      question: Optional[str] = None) -> dict:
    """Does stage 1 put the image into the compression tokens?  The cheapest check of a stage-1
    run, at any scale.

    From ``mmeb`` samples of one classification-like task (``task``; default: the first task
    whose positives are text only), each query's text without its image marker is the question
    (``question`` instead, e.g. the one stage 1 trained on) and the task's distinct positive texts
    are the candidate answers.  The stage-1 model (an export,
    or a plain VLM: the untrained baseline) scores every candidate as the answer after
    ``[X][C][Q]`` (mean CE over the answer tokens, :meth:`CoMaModel.stage1` ``per_row``) and
    picks the best, once with the sample's own image and once with another sample's image (a
    fixed derangement).  Under the compression mask the dialogue sees the image only through C,
    so ``true`` above ``swapped`` means the image travels through C; both at chance means it does
    not (yet).  Returns {"task", "n", "candidates", "chance", "true", "swapped"} (accuracies 0..1)."""
    from pipeline.collate import Collator, to_device
    from pipeline.export import inference_config, read_meta
    from pipeline.model import load_model
    from pipeline.prompts import strip_placeholders

    def text_only(s):
        return s["positive"].get("text") and s["positive"].get("image") is None and s["query"].get("image") is not None

    usable = [s for s in samples if text_only(s)]
    task = task or (usable[0]["task"] if usable else None)
    usable = [s for s in usable if s["task"] == task][: max_samples or None]
    if len(usable) < 2:
        raise ValueError(f"the compression probe needs >= 2 samples of a task whose queries have an image and whose "
                         f"positives are text (task={task!r}, found {len(usable)})")
    answers = sorted({s["positive"]["text"] for s in usable})
    cfg = inference_config(model_dir, read_meta(model_dir), dtype="float32", mask_impl="efficient",
                           stage1_loss="answer")
    model = load_model(cfg, for_training=False).to(device)
    collate = Collator(model.processor, cfg, kind="qa")
    n = len(usable)
    swapped = [usable[(i + 1) % n]["query"]["image"] for i in range(n)]
    result = {"task": task, "n": n, "candidates": len(answers), "chance": 1.0 / len(answers)}
    for name, images in (("true", [s["query"]["image"] for s in usable]), ("swapped", swapped)):
        hits = 0
        for lo in range(0, n, batch_size):
            chunk = list(range(lo, min(n, lo + batch_size)))
            losses = torch.stack([model.stage1(**to_device(collate([
                {"kind": "qa", "image": images[i], "__key__": str(i), "conversations": [
                    {"question": question or strip_placeholders(usable[i]["query"]["text"]) or "Describe the image.",
                     "answer": a}]} for i in chunk]), device), per_row=True).loss.float().cpu()
                for a in answers], dim=1)                                   # [chunk, candidates]
            truth = torch.tensor([answers.index(usable[i]["positive"]["text"]) for i in chunk])
            hits += int((losses.argmin(1) == truth).sum())
        result[name] = hits / n
    return result


# ----------------------------------------------------------------------------------- display
def format_table(results: dict, ks: Sequence[int] = DEFAULT_KS) -> str:
    """A fixed-width table (percentages) of per-task and overall metrics, with the candidate mode."""
    cols = ["P@1"] + [f"R@{k}" for k in ks] + ["MRR"]
    keys = ["precision@1"] + [f"recall@{k}" for k in ks] + ["mrr"]
    tasks = results["tasks"]
    w = max([len("overall (mean of tasks)")] + [len(t) for t in tasks]) + 2
    head = f"{'task':<{w}}{'n':>6}  {'cands':<12}" + "".join(f"{c:>8}" for c in cols)
    lines = [head, "-" * len(head)]

    def row(name, m, mode):
        vals = "".join(f"{100 * m[k]:>8.1f}" if not math.isnan(m[k]) else f"{'nan':>8}" for k in keys)
        return f"{name:<{w}}{m['n']:>6}  {mode:<12}{vals}"

    for t, m in tasks.items():
        mode = f"{m['candidate_mode']}({m['mean_candidates']:.0f})"
        lines.append(row(t, m, mode))
    lines.append("-" * len(head))
    lines.append(row("overall (mean of tasks)", results["overall"], ""))
    return "\n".join(lines)
