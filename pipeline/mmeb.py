"""The MMEB v1 evaluation protocol on a local copy of the evaluation data (nothing downloaded).

    from pipeline.mmeb import run_mmeb
    summary = run_mmeb(encode, mmeb_root="data/MMEB-eval", out_dir="runs/x/mmeb")

Layout of ``mmeb_root`` (that of the ``TIGER-Lab/MMEB-eval`` dataset snapshot): one entry per
dataset, any of ``{root}/{name}/*.parquet``, ``{root}/{name}/*.jsonl``, ``{root}/{name}.parquet``,
``{root}/{name}.jsonl``.  Each row::

    qry_text      str   the query text, ``<|image_1|>`` marking where the query image goes
    qry_img_path  str   image path relative to the image root ("" or null: no image)
    tgt_text      list  candidate texts ("" for none; a bare "" means "no candidate has text")
    tgt_img_path  list  candidate image paths ("" for none)

The first candidate is the correct one.  Images are resolved against ``image_root`` (default: the
first of ``{root}/eval_images``, ``{root}/images``, ``{root}`` that exists).

The CoMa authors' evaluation copy, ``ziyjiang/MMEB_Test_Instruct`` (the same layout per dataset),
keeps each side's instruction apart: ``qry_inst`` + ``qry_text``, ``tgt_inst`` + ``tgt_text``.
Rows with ``qry_inst`` are joined back as their evaluation does (:func:`instruct_row`: VLM2Vec's
five parsers, chosen per dataset as in VLM2Vec ``experiments/public/eval/image.yaml``), so the
released weights are scored on exactly the strings they were evaluated on.

Scoring follows MMEB's reference code: cosine similarity, prediction = ``argmax`` over the row's
candidates (so a tie goes to the earliest candidate), a row is correct when the prediction is the
first candidate; the dataset score is Precision@1.  Meta-task scores are the mean over their
datasets, in-distribution (the 20 datasets whose training splits are in MMEB-train) and
out-of-distribution (the other 16) likewise, overall = mean over all datasets present.  A dataset
absent from the local copy is reported and excluded from every mean; a dataset that cannot be read
(bad row, missing image) is reported as failed with the reason, also excluded, and the others go on.

Outputs in ``out_dir``: ``{dataset}_score.json``, ``{dataset}_pred.jsonl``, ``summary.json``,
``summary.txt``.  Every file is written atomically; a dataset whose score file exists is not
recomputed (``overwrite=True`` to redo), so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import glob
import json
import os
import time
from typing import Callable, Optional, Sequence

import torch

from pipeline.evaluate import Encode, ItemTable, embed_items, rank_of_positive
from pipeline.fileio import atomic_write_json, atomic_write_text
from pipeline.prompts import normalize_placeholders, strip_placeholders

# The 36 MMEB v1 datasets by meta-task, and which are in-distribution (their training splits are
# part of MMEB-train); lists as in the MMEB paper / TIGER-Lab VLM2Vec sources.
META_TASKS: dict[str, list[str]] = {
    "classification": ["ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397",
                       "Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"],
    "vqa": ["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W",
            "ScienceQA", "VizWiz", "GQA", "TextVQA"],
    "retrieval": ["VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t",
                  "NIGHTS", "WebQA", "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS"],
    "grounding": ["MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"],
}
IN_DISTRIBUTION: frozenset[str] = frozenset([
    "ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397",
    "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W",
    "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA",
    "MSCOCO",
])
ALL_DATASETS: list[str] = [d for ds in META_TASKS.values() for d in ds]
DATASET_META: dict[str, str] = {d: m for m, ds in META_TASKS.items() for d in ds}
assert len(ALL_DATASETS) == 36 and len(IN_DISTRIBUTION) == 20 and IN_DISTRIBUTION <= set(ALL_DATASETS)


# Which of VLM2Vec's eval parsers (src/data/eval_dataset/image_*.py, as in CoMa) reads each
# dataset of the instruction-apart copy: VLM2Vec experiments/public/eval/image.yaml, L2-222.
INSTRUCT_PARSER: dict[str, str] = {
    **{d: "cls" for d in META_TASKS["classification"]},
    **{d: "qa" for d in META_TASKS["vqa"]},
    "MSCOCO_i2t": "i2t", "VisualNews_i2t": "i2t",
    **{d: "t2i" for d in ("VisDial", "MSCOCO_t2i", "VisualNews_t2i", "WebQA", "EDIS", "Wiki-SS-NQ")},
    **{d: "i2i_vg" for d in ("CIRR", "NIGHTS", "OVEN", "FashionIQ", *META_TASKS["grounding"])},
}
assert set(INSTRUCT_PARSER) == set(ALL_DATASETS)
IMAGE_MARK = "<|image_1|>"


class MMEBDataError(ValueError):
    """A dataset of the local copy is unusable; the message names the file, the row and the fix."""


# ------------------------------------------------------------------------------------ reading
def dataset_files(root: str, name: str) -> list[str]:
    """The row files of dataset ``name`` under ``root`` (empty list = the dataset is missing)."""
    d = os.path.join(root, name)
    for pattern in ("*.parquet", "*.jsonl", "*/*.parquet"):
        files = sorted(glob.glob(os.path.join(d, pattern)))
        if files:
            return files
    return [f for f in (d + ".parquet", d + ".jsonl") if os.path.isfile(f)]


def read_rows(files: Sequence[str]) -> list[tuple[str, int, dict]]:
    """Rows of a dataset as (file, 1-based row number, row dict), in file order."""
    rows = []
    for f in files:
        if f.endswith(".parquet"):
            import pyarrow.parquet as pq

            cols = ["qry_text", "qry_img_path", "tgt_text", "tgt_img_path"]
            table = pq.read_table(f)
            cols += [c for c in ("qry_inst", "tgt_inst") if c in table.column_names]  # the authors' copy
            missing = [c for c in cols if c not in table.column_names]
            if missing:
                raise MMEBDataError(f"{f}: missing column(s) {missing}; MMEB rows need {cols}")
            for i, r in enumerate(table.select(cols).to_pylist()):
                rows.append((f, i + 1, r))
        else:
            with open(f, encoding="utf-8") as fh:
                for i, line in enumerate(fh):
                    if not line.strip():
                        continue
                    try:
                        rows.append((f, i + 1, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise MMEBDataError(f"{f}:{i + 1}: not valid JSON ({e.msg})") from None
    return rows


def default_image_root(root: str) -> str:
    for cand in ("eval_images", "images"):
        p = os.path.join(root, cand)
        if os.path.isdir(p):
            return p
    return root


def _side(text: Optional[str], img: Optional[str], image_root: str, where: str, role: str,
          newline: Optional[bool] = None, literal: bool = False) -> dict:
    """One query/candidate → encoder item (image as a resolved path; the encoder opens it).
    ``newline``: whether ``official_eval`` ends the input with "\n" before C (None: its rule);
    ``literal``: a text-only side keeps its whitespace (a joined instruction-apart row)."""
    item = {}
    if img:
        path = img if os.path.isabs(img) else os.path.join(image_root, img)
        if not os.path.isfile(path):
            raise MMEBDataError(f"{where}: image {img!r} not found (looked for {path}); pass the folder "
                                "holding MMEB's images as --image-root")
        item["image"] = path
        text = normalize_placeholders(text) if text else text
    elif not literal:
        text = strip_placeholders(text) if text else text
    if text:
        item["text"] = text
    if not item:
        raise MMEBDataError(f"{where}: neither text nor image")
    return {**item, "role": role, **({} if newline is None else {"newline": newline})}


def instruct_row(dataset: str, row: dict) -> tuple[dict, Optional[bool]]:
    """A row of the instruction-apart copy → (the fields :func:`parse_row` reads, the candidates'
    newline override), joined as the authors' evaluation joins them (CoMa
    ``src/data/eval_dataset/``, ``src/model/processor.py: process_input_text``).  ``I`` is the
    image, ``inst``/``text`` the row's fields; every query then gets their ``"\n"`` before C
    (``official_eval``):

    * ``cls``, ``i2t``: query ``I + " " + inst [+ " " + text]`` (the instruction unstripped),
      ``" \n"`` → ``"\n"``; candidates: ``tgt_text`` as written (text only, no newline);
    * ``qa``: query ``I + "\n" + inst.strip() [+ " " + text]``; candidates as ``cls``;
    * ``t2i``: query ``inst + " " + text`` (text only; VisDial one ``"\n"`` more); image
      candidates ``I + " " + tgt_inst [+ " " + caption]`` (WebQA, EDIS have captions);
    * ``i2i_vg``: query as ``qa``; candidates as ``t2i``, but without a caption their input
      ends without the newline (``image_i2i_vg_dataset.py`` L37-38)."""
    parser = INSTRUCT_PARSER[dataset]

    def join(inst: str, text: Optional[str]) -> str:  # process_input_text: I + " " + inst [+ " " + text]
        return (IMAGE_MARK + " " + inst + (" " + text if text else "")).replace(" \n", "\n")

    inst = (row.get("qry_inst") or "").replace(IMAGE_MARK, "")
    qtext, qimg = row.get("qry_text"), row.get("qry_img_path")
    texts, imgs = row.get("tgt_text") or [], row.get("tgt_img_path") or []
    newline = None
    if parser in ("cls", "i2t"):
        out_q, out_t, out_i = join(inst, qtext), list(texts), [""] * len(texts)
    elif parser == "qa":
        out_q, out_t, out_i = join("\n" + inst.strip(), qtext), list(texts), [""] * len(texts)
    else:
        if parser == "t2i":
            out_q, qimg = inst + " " + (qtext or "") + ("\n" if dataset == "VisDial" else ""), None
        else:
            out_q = join("\n" + inst.strip(), qtext)
        tinst = row.get("tgt_inst") or ""
        captioned = bool(texts) and bool((texts[0] or "").strip())
        out_t = [IMAGE_MARK + " " + tinst + (" " + (t or "") if captioned else "") for t in (texts if captioned else imgs)]
        out_i = list(imgs)
        newline = None if captioned or parser == "t2i" else False
    return {"qry_text": out_q, "qry_img_path": qimg, "tgt_text": out_t, "tgt_img_path": out_i}, newline


def parse_row(file: str, lineno: int, row: dict, image_root: str,
              dataset: Optional[str] = None) -> tuple[dict, list[dict]]:
    """A raw MMEB row → (query item, candidate items; the first is the correct one).  A row of the
    authors' instruction-apart copy (``qry_inst``) is joined first (:func:`instruct_row`), which
    needs the ``dataset`` name."""
    where = f"{file}:{lineno}"
    newline, literal = None, "qry_inst" in row  # joined strings keep their whitespace, as theirs do
    if literal:
        if dataset not in INSTRUCT_PARSER:
            raise MMEBDataError(f"{where}: a row with qry_inst (the instruction-apart copy) needs its MMEB dataset "
                                f"name to be joined, got {dataset!r}")
        row, newline = instruct_row(dataset, row)
    for k in ("qry_text", "tgt_text"):
        if k not in row:
            raise MMEBDataError(f"{where}: missing field '{k}'")
    query = _side(row.get("qry_text"), row.get("qry_img_path"), image_root, where + " (query)", "query",
                  literal=literal)
    imgs = row.get("tgt_img_path") or []
    texts = row.get("tgt_text")
    if texts in ("", None):  # MMEB writes "" when no candidate has text
        texts = [""] * len(imgs)
    if isinstance(texts, str) or isinstance(imgs, str):
        raise MMEBDataError(f"{where}: tgt_text and tgt_img_path must be lists")
    if imgs and len(imgs) != len(texts):
        raise MMEBDataError(f"{where}: {len(texts)} tgt_text but {len(imgs)} tgt_img_path entries")
    imgs = list(imgs) or [""] * len(texts)
    if not texts:
        raise MMEBDataError(f"{where}: no candidates")
    cands = [_side(t, i, image_root, f"{where} (candidate {j})", "candidate", newline, literal)
             for j, (t, i) in enumerate(zip(texts, imgs))]
    return query, cands


# ------------------------------------------------------------------------------------ scoring
def evaluate_dataset(encode: Encode, rows: list[tuple[str, int, dict]], image_root: str,
                     batch_size: int = 32, progress: bool = True, desc: str = "",
                     dataset: Optional[str] = None) -> tuple[dict, list[dict]]:
    """Score one dataset (``dataset``: its MMEB name, needed for the authors' instruction-apart
    rows).  Returns (score dict, one prediction dict per row)."""
    parsed = [parse_row(f, n, r, image_root, dataset) for f, n, r in rows]
    if not parsed:
        raise MMEBDataError(f"{desc}: no rows")
    # Embed every distinct input once (MMEB's reference code keys embeddings by (text, image) too;
    # images here are path strings, so the table keys them by path without reading them).
    table = ItemTable()
    rows_idx = [(table.add(q), [table.add(c) for c in cands]) for q, cands in parsed]
    emb = embed_items(encode, table.items, batch_size, desc=desc or "embedding", progress=progress)
    preds, correct = [], 0
    for (f, n, _), (_q, cands), (qi, ci) in zip(rows, parsed, rows_idx):
        qv = emb[qi]
        cv = emb[torch.as_tensor(ci)]
        scores = cv @ qv
        pred = int(torch.argmax(scores))          # first maximum, as numpy.argmax
        rank = rank_of_positive(scores, 0, ties="first")
        correct += pred == 0
        preds.append({"row": f"{os.path.basename(f)}:{n}", "pred": pred, "correct": pred == 0,
                      "rank": rank, "pred_text": cands[pred].get("text"),
                      "pred_img_path": os.path.relpath(cands[pred]["image"], image_root) if "image" in cands[pred] else None,
                      "positive_score": float(scores[0]), "top_score": float(scores[pred])})
    score = {"n": len(parsed), "num_correct": int(correct), "precision@1": correct / len(parsed),
             "num_candidates": sum(len(c) for _, c in parsed) / len(parsed)}
    return score, preds


# ------------------------------------------------------------------------------------ writing
def _mean(xs: list[float]) -> Optional[float]:
    return sum(xs) / len(xs) if xs else None


def aggregate(scores: dict[str, float], datasets: Sequence[str]) -> dict:
    """Per-dataset Precision@1 (fractions) → meta-task, ID, OOD and overall means over those present.

    ``datasets`` is the list asked for; those without a score are listed as ``missing``.
    """
    present = [d for d in datasets if d in scores]
    out = {"meta_tasks": {}, "counts": {}}
    for meta, ds in META_TASKS.items():
        vals = [scores[d] for d in ds if d in scores]
        out["meta_tasks"][meta] = _mean(vals)
        out["counts"][meta] = f"{len(vals)}/{len(ds)}"
    ind = [scores[d] for d in present if d in IN_DISTRIBUTION]
    ood = [scores[d] for d in present if d not in IN_DISTRIBUTION]
    out["in_distribution"] = _mean(ind)
    out["out_of_distribution"] = _mean(ood)
    out["overall"] = _mean([scores[d] for d in present])
    out["counts"].update({"in_distribution": f"{len(ind)}/20", "out_of_distribution": f"{len(ood)}/16",
                          "overall": f"{len(present)}/{len(ALL_DATASETS)}"})
    return out


def format_summary(summary: dict) -> str:
    """Summary table in percent, datasets grouped by meta-task (ID/OOD marked)."""
    def pct(x):
        return "   -" if x is None else f"{100 * x:5.1f}"

    lines = [f"{'dataset':<22}{'split':<6}{'n':>6}{'P@1':>8}", "-" * 42]
    for meta, ds in META_TASKS.items():
        for d in ds:
            split = "ID" if d in IN_DISTRIBUTION else "OOD"
            if d in summary["datasets"]:
                s = summary["datasets"][d]
                lines.append(f"{d:<22}{split:<6}{s['n']:>6}{pct(s['precision@1']):>8}")
            elif d in summary["failed"]:
                lines.append(f"{d:<22}{split:<6}{'':>6}{'FAILED':>8}")
            elif d in summary["missing"]:
                lines.append(f"{d:<22}{split:<6}{'':>6}{'missing':>8}")
    agg = summary["aggregate"]
    lines.append("-" * 42)
    for meta in META_TASKS:
        lines.append(f"{meta:<22}{agg['counts'][meta]:<12}{pct(agg['meta_tasks'][meta]):>8}")
    for k, label in (("in_distribution", "in-distribution"), ("out_of_distribution", "out-of-distribution"),
                     ("overall", "overall")):
        lines.append(f"{label:<22}{agg['counts'][k]:<12}{pct(agg[k]):>8}")
    if summary["missing"]:
        lines.append(f"missing (excluded from the means): {', '.join(summary['missing'])}")
    for d, why in summary["failed"].items():
        lines.append(f"FAILED {d} (excluded): {why}")
    return "\n".join(lines)


def run_mmeb(encode: Encode, mmeb_root: str, out_dir: str, datasets: Optional[Sequence[str]] = None,
             image_root: Optional[str] = None, batch_size: int = 32, max_rows: Optional[int] = None,
             overwrite: bool = False, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run the protocol over ``datasets`` (default: all 36) and write the outputs (see module doc).

    Returns the summary dict (also written to ``out_dir/summary.json``)::

        {"datasets": {name: score dict}, "missing": [...], "failed": {name: reason},
         "aggregate": {"meta_tasks": {...}, "in_distribution", "out_of_distribution", "overall", "counts"}}
    """
    if not os.path.isdir(mmeb_root):
        raise MMEBDataError(f"--mmeb-root {mmeb_root} is not a directory")
    datasets = list(datasets) if datasets else list(ALL_DATASETS)
    unknown = [d for d in datasets if d not in DATASET_META]
    if unknown:
        raise MMEBDataError(f"unknown MMEB dataset(s) {unknown}; valid names: {ALL_DATASETS}")
    image_root = image_root or default_image_root(mmeb_root)
    os.makedirs(out_dir, exist_ok=True)
    results, missing, failed = {}, [], {}
    for i, name in enumerate(datasets):
        score_path = os.path.join(out_dir, f"{name}_score.json")
        if not overwrite and os.path.isfile(score_path):
            with open(score_path, encoding="utf-8") as f:
                results[name] = json.load(f)
            log(f"[{i + 1}/{len(datasets)}] {name}: reusing {score_path}")
            continue
        files = dataset_files(mmeb_root, name)
        if not files:
            missing.append(name)
            log(f"[{i + 1}/{len(datasets)}] {name}: MISSING under {mmeb_root} (excluded from the means)")
            continue
        t0 = time.time()
        try:
            rows = read_rows(files)[:max_rows] if max_rows else read_rows(files)
            score, preds = evaluate_dataset(encode, rows, image_root, batch_size, progress,
                                            desc=f"[{i + 1}/{len(datasets)}] {name}", dataset=name)
        except MMEBDataError as e:
            failed[name] = str(e)
            log(f"[{i + 1}/{len(datasets)}] {name}: FAILED: {e}")
            continue
        score.update({"dataset": name, "meta_task": DATASET_META[name],
                      "split": "ID" if name in IN_DISTRIBUTION else "OOD",
                      "files": [os.path.relpath(f, mmeb_root) for f in files], "seconds": round(time.time() - t0, 2)})
        atomic_write_text(os.path.join(out_dir, f"{name}_pred.jsonl"), "".join(json.dumps(p) + "\n" for p in preds))
        atomic_write_json(score_path, score)  # last: its presence marks the dataset done
        results[name] = score
        log(f"[{i + 1}/{len(datasets)}] {name}: P@1 {100 * score['precision@1']:.1f} over {score['n']} rows")
    summary = {"mmeb_root": os.path.abspath(mmeb_root), "datasets": results, "missing": missing, "failed": failed,
               "aggregate": aggregate({d: s["precision@1"] for d, s in results.items()}, datasets),
               "metric": "precision@1 (fraction); tables print percent"}
    atomic_write_json(os.path.join(out_dir, "summary.json"), summary)
    atomic_write_text(os.path.join(out_dir, "summary.txt"), format_summary(summary) + "\n")
    return summary
