"""The mteb wrapper (pipeline/mteb_model.py, launch/eval_mteb.py) on small tasks defined here from
the bundled digits: mteb's scores equal the same metric computed by hand from ``Embedder.encode``
on the items the wrapper is documented to build.  Nothing is downloaded."""
import io
import json
import math

import numpy as np
import pytest
import torch
import mteb
from datasets import Dataset, DatasetDict  # the [mteb] extra is part of [dev]
from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.abstasks.zeroshot_classification import AbsTaskZeroShotClassification

from pipeline.embedder import Embedder
from pipeline.export import export_model
from pipeline.model import load_model
from pipeline.mteb_model import CoMaMTEB, mmeb_item
from tests.tiny_models import WORDS, model_cfg

QUERY_PROMPT = "Find the name of the handwritten digit."
QUESTION = "Which digit is written here?"
RETRIEVAL_PROMPT = AbsTaskRetrieval.abstask_prompt        # mteb's fallbacks for tasks without a prompt
ZERO_SHOT_PROMPT = AbsTaskZeroShotClassification.abstask_prompt
PROBE_PROMPT = AbsTaskClassification.abstask_prompt


def _digits(n: int, offset: int = 0):
    """``n`` bundled digit images (PIL, RGB, 56 px as data_prep/builtin.py renders them) and labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from data_prep import builtin

    d = load_digits()
    idx = range(offset, offset + n)
    return ([Image.open(io.BytesIO(builtin.render(d.images[i]))).convert("RGB") for i in idx],
            [int(d.target[i]) for i in idx])


def _label(d: int) -> str:
    return f"a handwritten {WORDS[d]}"


def _meta(name, type_, category, modalities, main_score, prompt=None, splits=("test",)):
    m = TaskMetadata(name=name, type=type_, category=category, main_score=main_score, prompt=prompt,
                     description="bundled digits, a test task", reference="https://example.org",
                     dataset={"path": "local", "revision": "1"}, eval_splits=list(splits),
                     eval_langs=["eng-Latn"], date=("2024-01-01", "2024-01-01"), dialect=[], domains=[],
                     task_subtypes=[], license="cc-by-4.0", annotations_creators="derived",
                     sample_creation="found", bibtex_citation="")
    m.modalities = modalities
    return m


class _DigitsToName(AbsTaskRetrieval):
    """12 digit images (from ``offset``) as queries, ``query_text`` beside each when set → the
    ten digit names; one relevant name per query."""
    offset, query_text = 0, None

    def load_data(self, num_proc=None, **kwargs):
        imgs, ys = _digits(12, offset=self.offset)
        queries = [{"id": f"q{i}", "image": im, **({"text": self.query_text} if self.query_text else {})}
                   for i, im in enumerate(imgs)]
        self.dataset = {"default": {"test": RetrievalSplitData(
            queries=Dataset.from_list(queries), corpus=Dataset.from_list([{"id": f"d{d}", "text": _label(d)}
                                                                          for d in range(10)]),
            relevant_docs={f"q{i}": {f"d{y}": 1} for i, y in enumerate(ys)}, top_ranked=None)}}
        self.data_loaded = True


class DigitsI2T(_DigitsToName):
    """Image → the digit's name; the query side carries the task prompt."""
    metadata = _meta("DigitsI2T", "Any2AnyRetrieval", "i2t", ["image", "text"], "ndcg_at_10",
                     prompt={"query": QUERY_PROMPT})


class DigitsIT2T(_DigitsToName):
    """Interleaved query (image + question) → name; no prompt."""
    metadata = _meta("DigitsIT2T", "Any2AnyRetrieval", "it2t", ["image", "text"], "ndcg_at_10")
    offset, query_text = 20, QUESTION


class DigitsZeroShot(AbsTaskZeroShotClassification):
    metadata = _meta("DigitsZeroShot", "ZeroShotClassification", "i2t", ["image", "text"], "accuracy")

    def load_data(self, num_proc=None, **kwargs):
        imgs, ys = _digits(16, offset=40)
        self.dataset = DatasetDict({"test": Dataset.from_dict({"image": imgs, "label": ys})})
        self.data_loaded = True

    def get_candidate_labels(self):
        return [_label(d) for d in range(10)]


class DigitsLinearProbe(AbsTaskClassification):
    """Logistic regression on the image embeddings (one experiment on every training image)."""
    metadata = _meta("DigitsLinearProbe", "ImageClassification", "i2c", ["image"], "accuracy")
    n_experiments = 1
    samples_per_label = 1000
    input_column_name = "image"

    def load_data(self, num_proc=None, **kwargs):
        tr, ytr = _digits(40, offset=60)
        te, yte = _digits(20, offset=100)
        self.dataset = DatasetDict({"train": Dataset.from_dict({"image": tr, "label": ytr}),
                                    "test": Dataset.from_dict({"image": te, "label": yte})})
        self.data_loaded = True


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    return export_model(load_model(model_cfg(lora=None)), tmp_path_factory.mktemp("mteb") / "export")


def _ndcg_recall(q: torch.Tensor, d: torch.Tensor, gold: list[int]) -> tuple[float, float]:
    """nDCG@10 and recall@1 with one relevant document per query, cosine scores (L2-normalised)."""
    s = (q.double() @ d.double().t())
    ranks = [1 + int((s[i] > s[i, g]).sum()) for i, g in enumerate(gold)]
    return (sum(1 / math.log2(r + 1) if r <= 10 else 0.0 for r in ranks) / len(ranks),
            sum(r == 1 for r in ranks) / len(ranks))


def _scores(result, name):
    (tr,) = [t for t in result.task_results if t.task_name == name]
    return tr.scores["test"][0]


def test_mteb_scores_equal_hand_computed_metrics(export, tmp_path):
    """Retrieval (image and image+text queries) and classification (zero-shot and linear probe):
    finite, and equal to the metric computed from ``Embedder.encode`` on MMEB-style items."""
    from sklearn.linear_model import LogisticRegression

    model = CoMaMTEB(str(export), device="cpu", batch_size=5)
    tasks = [DigitsI2T(), DigitsIT2T(), DigitsZeroShot(), DigitsLinearProbe()]
    result = mteb.evaluate(model, tasks, cache=mteb.ResultCache(tmp_path), show_progress_bar=False)
    emb = Embedder.from_pretrained(export, device="cpu")
    names = emb.encode([{"text": _label(d)} for d in range(10)])

    imgs, ys = _digits(12)   # the prompt goes after the image, before the (absent) text, as MMEB's queries
    q = emb.encode([{"text": f"<image>\n{QUERY_PROMPT}", "image": im} for im in imgs])
    ndcg, r1 = _ndcg_recall(q, names, ys)
    s = _scores(result, "DigitsI2T")
    assert math.isfinite(s["main_score"])
    assert s["ndcg_at_10"] == pytest.approx(ndcg, abs=1e-5) and s["recall_at_1"] == pytest.approx(r1, abs=1e-5)

    imgs, ys = _digits(12, offset=20)   # no prompt of its own: the query side gets mteb's generic one
    q = emb.encode([{"text": f"<image>\n{RETRIEVAL_PROMPT} {QUESTION}", "image": im} for im in imgs])
    ndcg, r1 = _ndcg_recall(q, names, ys)
    s = _scores(result, "DigitsIT2T")
    assert s["ndcg_at_10"] == pytest.approx(ndcg, abs=1e-5) and s["recall_at_1"] == pytest.approx(r1, abs=1e-5)

    imgs, ys = _digits(16, offset=40)
    zs = [{"text": ZERO_SHOT_PROMPT + " " + _label(d)} for d in range(10)]   # untyped: both sides
    pred = (emb.encode([{"text": f"<image>\n{ZERO_SHOT_PROMPT}", "image": im} for im in imgs])
            @ emb.encode(zs).t()).argmax(1).tolist()
    s = _scores(result, "DigitsZeroShot")
    assert s["accuracy"] == pytest.approx(np.mean([p == y for p, y in zip(pred, ys)]))

    tr, ytr = _digits(40, offset=60)
    te, yte = _digits(20, offset=100)
    order = list(range(len(tr)))
    np.random.RandomState(DigitsLinearProbe().seed).shuffle(order)   # mteb's undersampling order
    probe = f"<image>\n{PROBE_PROMPT}"
    xtr = emb.encode([{"text": probe, "image": tr[i]} for i in order]).numpy()
    clf = LogisticRegression(max_iter=100, random_state=DigitsLinearProbe().seed).fit(xtr, [ytr[i] for i in order])
    s = _scores(result, "DigitsLinearProbe")
    acc = float(np.mean(clf.predict(emb.encode([{"text": probe, "image": im} for im in te]).numpy()) == np.array(yte)))
    assert math.isfinite(s["main_score"]) and s["accuracy"] == pytest.approx(acc)

    from mteb.types import PromptType   # documents: an instruction only when one is given for them
    assert model.instruction(DigitsI2T.metadata, PromptType.document) == ""
    model.prompts_dict = {"document": "Represent the name."}
    assert model.instruction(DigitsI2T.metadata, PromptType.document) == "Represent the name."

    meta = model.mteb_model_meta
    assert meta.embed_dim == names.shape[1] and meta.modalities == ["image", "text"]
    assert meta.similarity_fn_name.value == "cosine" and meta.name == "local/export"


def test_mmeb_item_layout():
    img = object()
    assert mmeb_item("a cat", None, "Find an image:") == {"text": "Find an image: a cat"}
    assert mmeb_item(None, img, "Represent the image.") == {"text": "<image>\nRepresent the image.", "image": img}
    assert mmeb_item(" what? ", img) == {"text": "<image>\nwhat?", "image": img}
    assert mmeb_item("", img) == {"text": None, "image": img}


def test_eval_mteb_cli(export, tmp_path, capsys, repo_root):
    """launch/eval_mteb.py with a local task class: mteb's results folder, summary.json, the table;
    a rerun reuses the results; bad input is one line naming the flag."""
    from tests.conftest import load_script

    cli = load_script(repo_root / "launch" / "eval_mteb.py")
    out = tmp_path / "res"
    assert cli.main(["--model", str(export), "--tasks", "tests.test_mteb:DigitsZeroShot", "--out", str(out),
                     "--device", "cpu", "--name", "me/tiny", "--revision", "r1"]) == 0
    printed = capsys.readouterr().out
    assert "DigitsZeroShot" in printed and "accuracy" in printed
    saved = json.loads((out / "results" / "me__tiny" / "r1" / "DigitsZeroShot.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    (row,) = summary["rows"]
    assert row["score"] == pytest.approx(100 * saved["scores"]["test"][0]["main_score"])
    assert cli.main(["--model", str(export), "--tasks", "tests.test_mteb:DigitsZeroShot", "--out", str(out),
                     "--device", "cpu", "--name", "me/tiny", "--revision", "r1"]) == 0   # from the cache

    assert cli.main(["--model", str(export), "--tasks", "NoSuchTaskAnywhere", "--out", str(out)]) == 2
    assert "NoSuchTaskAnywhere" in capsys.readouterr().err
    assert cli.main(["--model", str(tmp_path / "nope"), "--tasks", "tests.test_mteb:DigitsZeroShot",
                     "--out", str(out)]) == 2
    assert "--model" in capsys.readouterr().err
    assert cli.main(["--model", str(export), "--tasks", "tests.nothing:X", "--out", str(out)]) == 2
    assert "tests.nothing:X" in capsys.readouterr().err
