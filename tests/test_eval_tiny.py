"""The evaluation entry points end to end with a real (tiny, untrained) exported model:
launch/evaluate.py on mmeb shards of real digit scans, launch/eval_mmeb.py on an MMEB-layout copy."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_models import model_cfg

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    from pipeline.config import LoraConfig
    from pipeline.export import export_model
    from pipeline.model import load_model

    model = load_model(model_cfg(lora=LoraConfig(enabled=False)), for_training=False)
    return str(export_model(model, tmp_path_factory.mktemp("untrained") / "export"))


def digits(n):
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for i in range(n):
        px = (d.images[i] * (255.0 / 16.0)).astype(np.uint8)
        out.append((Image.fromarray(px, mode="L").resize((56, 56), Image.NEAREST).convert("RGB"), int(d.target[i])))
    return out


def test_evaluate_cli_with_tiny_model(export_dir, tmp_path):
    import launch.evaluate as cli
    from data_prep import shard
    from pipeline.evaluate import load_encoder, read_mmeb_shards

    data = digits(6)
    for i, (img, _) in enumerate(data):
        img.save(tmp_path / f"d{i}.png")
    recs = []
    for i, (_, y) in enumerate(data):
        # t2i with own negatives (the next two digits), and classification against the task pool
        recs.append({"key": f"t2i{i}", "task": "t2i", "query": {"text": f"a handwritten {WORDS[y]}", "image": None},
                     "positive": {"text": None, "image": f"d{i}.png"},
                     "negatives": [{"text": None, "image": f"d{(i + k) % 6}.png"} for k in (1, 2)]})
        recs.append({"key": f"cls{i}", "task": "classification",
                     "query": {"text": "<image> Which digit is this?", "image": f"d{i}.png"},
                     "positive": {"text": WORDS[y], "image": None}})
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert shard.main(["--input", str(tmp_path / "eval.jsonl"), "--output", str(tmp_path / "shards"), "--kind", "mmeb",
                       "--prefix", "eval", "--samples-per-shard", "12", "--workers", "1"]) == 0
    out = tmp_path / "run" / "scores.json"
    rc = cli.main(["--model", export_dir, "--data", str(tmp_path / "shards" / "eval-{000000..000000}.tar"), "--out", str(out),
                   "--batch-size", "4", "--device", "cpu", "--plot"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["tasks"]) == {"t2i", "classification"}
    assert res["tasks"]["t2i"]["candidate_mode"] == "own" and res["tasks"]["t2i"]["mean_candidates"] == 3
    assert res["tasks"]["classification"]["candidate_mode"] == "pool"
    assert (tmp_path / "run" / "precision_at_1.png").stat().st_size > 1000

    # Recompute one t2i rank and one classification rank straight from the Embedder's vectors.
    samples = read_mmeb_shards(str(tmp_path / "shards"))
    encode = load_encoder(export_dir, device="cpu")
    s = samples[0]
    q = encode([{"text": s["query"]["text"]}])[0]
    c = encode([{"image": s["positive"]["image"]}] + [{"image": n["image"]} for n in s["negatives"]])
    scores = c @ q
    assert res["predictions"][0]["rank"] == int((scores[1:] >= scores[0]).sum())
    cls = [p for p in res["predictions"] if p["task"] == "classification"]
    labels = list(dict.fromkeys(WORDS[y] for _, y in data))       # the task pool, first-seen order
    pool = encode([{"text": t} for t in labels])
    qv = encode([{"text": samples[1]["query"]["text"], "image": samples[1]["query"]["image"]}])[0]
    sc = pool @ qv
    pos = labels.index(WORDS[data[0][1]])
    assert cls[0]["rank"] == int(torch.cat([sc[:pos], sc[pos + 1:]]).ge(sc[pos]).sum())
    assert cls[0]["pred"] == int(sc.argmax())


def test_eval_mmeb_cli_with_tiny_model(export_dir, tmp_path):
    import launch.eval_mmeb as cli

    root = tmp_path / "MMEB-eval"
    (root / "eval_images" / "MNIST").mkdir(parents=True)
    data = digits(4)
    for i, (img, _) in enumerate(data):
        img.save(root / "eval_images" / "MNIST" / f"{i}.png")
    (root / "ImageNet-1K").mkdir()
    with open(root / "ImageNet-1K" / "test.jsonl", "w") as f:
        for i, (_, y) in enumerate(data):
            f.write(json.dumps({"qry_text": "<|image_1|> Represent the given image for classification",
                                "qry_img_path": f"MNIST/{i}.png",
                                "tgt_text": [WORDS[y]] + [WORDS[(y + k) % 10] for k in (1, 2, 3)],
                                "tgt_img_path": ["", "", "", ""]}) + "\n")
    out = tmp_path / "mmeb-out"
    rc = cli.main(["--model", export_dir, "--mmeb-root", str(root), "--out", str(out), "--device", "cpu",
                   "--datasets", "ImageNet-1K", "VOC2007"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing"] == ["VOC2007"] and summary["datasets"]["ImageNet-1K"]["n"] == 4
    assert summary["aggregate"]["overall"] == summary["datasets"]["ImageNet-1K"]["precision@1"]
    assert len((out / "ImageNet-1K_pred.jsonl").read_text().splitlines()) == 4
    assert cli.main(["--model", export_dir, "--mmeb-root", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert cli.main(["--model", str(tmp_path), "--mmeb-root", str(root), "--out", str(out)]) == 2  # not an export


def test_entry_points_check_their_outputs_before_any_work(tmp_path, capsys):
    """A --out that is a folder where a file goes (or the reverse), or that sits under a file,
    is refused with exit 2 before the model loads or the data is read: it used to fail at the
    final write, after the whole evaluation or export."""
    import launch.eval_mmeb as eval_mmeb
    import launch.evaluate as evaluate
    import launch.export as export
    from pipeline.fileio import output_problem

    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    assert output_problem(tmp_path / "a_folder", folder=False).endswith("exists and is a folder")
    assert output_problem(tmp_path / "a_file", folder=True).endswith("exists and is a file")
    assert "is a file, so" in output_problem(tmp_path / "a_file" / "sub" / "scores.json", folder=False)
    assert output_problem(tmp_path / "new" / "deeper" / "scores.json", folder=False) is None

    # the model and data do not exist either: the output is what gets reported, first
    missing = str(tmp_path / "missing")
    assert evaluate.main(["--model", missing, "--data", missing, "--out", str(tmp_path / "a_folder")]) == 2
    assert eval_mmeb.main(["--model", missing, "--mmeb-root", str(tmp_path), "--out", str(tmp_path / "a_file")]) == 2
    assert export.main(["--checkpoint", missing, "--out", str(tmp_path / "a_file")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[1] for line in err] == ["--out"] * 3, err
    assert export.main(["--checkpoint", str(tmp_path / "a_folder"), "--out", str(tmp_path / "x")]) == 2
    assert "--checkpoint=" in capsys.readouterr().err


def test_compression_probe_ranks_answers_by_their_loss(export_dir):
    """The probe's pick for an image is the candidate answer with the lowest per-row stage-1 loss
    after [X][C][Q] (computed here by hand for each row), with the true and with a swapped image."""
    from pipeline.collate import Collator
    from pipeline.config import LoraConfig, ModelConfig
    from pipeline.evaluate import compression_probe
    from pipeline.model import load_model

    samples = [{"task": "cls", "query": {"text": "<image> Which digit is it?", "image": img},
                "positive": {"text": WORDS[d], "image": None}, "negatives": []} for img, d in digits(12)]
    res = compression_probe(export_dir, samples, max_samples=12, batch_size=5)
    answers = sorted({s["positive"]["text"] for s in samples})
    assert (res["task"], res["n"], res["candidates"]) == ("cls", 12, len(answers))
    cfg = ModelConfig(init=export_dir, num_compression_tokens=4, dtype="float32", gradient_checkpointing=False,
                      dummy_vision=False, lora=LoraConfig(enabled=False))
    model = load_model(cfg, for_training=False)
    collate = Collator(model.processor, cfg, kind="qa")

    def pick(i, image):
        with torch.no_grad():
            one = [float(model.stage1(**collate([{"kind": "qa", "image": image, "__key__": "k", "conversations": [
                {"question": "Which digit is it?", "answer": a}]}])).loss) for a in answers]
        return answers[int(np.argmin(one))] == samples[i]["positive"]["text"]

    true = sum(pick(i, s["query"]["image"]) for i, s in enumerate(samples)) / 12
    swapped = sum(pick(i, samples[(i + 1) % 12]["query"]["image"]) for i in range(12)) / 12
    assert res["true"] == pytest.approx(true) and res["swapped"] == pytest.approx(swapped)
    with pytest.raises(ValueError, match="compression probe needs"):
        compression_probe(export_dir, samples[:1])
