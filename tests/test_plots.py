import json

import numpy as np
import pytest
from PIL import Image

from vitkit.plots import DPI, confusion_png, confusion_size, read_metrics, training_curves


def records(evals: bool = True) -> list[dict]:
    out = []
    for step in range(1, 41):
        epoch = step / 10
        out.append(dict(kind="train", step=step, epoch=epoch, loss=2.3 / step**0.3, lr=1e-3 * min(1, step / 5)))
        if evals and step % 10 == 0:
            out.append(dict(kind="eval", step=step, epoch=epoch, loss=2 / epoch, top1=0.2 * epoch, top5=0.24 * epoch))
    return out


def size_of(png) -> tuple[int, int]:
    with Image.open(png) as image:
        image.load()
        return image.size


def test_training_curves_from_a_log_file(tmp_path):
    log = tmp_path / "run" / "metrics.jsonl"
    log.parent.mkdir()
    lines = [json.dumps(r) for r in records()] + [json.dumps({"kind": "note", "text": "other kinds are ignored"})]
    log.write_text("\n".join(lines) + '\n{"kind": "train", "ste')  # a run still writing its last line
    assert len(read_metrics(log)) == 45
    out = training_curves(log, tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    assert size_of(out) == (15 * DPI, round(4.5 * DPI))


def test_training_curves_with_train_records_only(tmp_path):
    out = training_curves(records(evals=False), tmp_path / "sub" / "c.png")
    assert size_of(out) == (15 * DPI, round(4.5 * DPI))


def test_training_curves_errors(tmp_path):
    with pytest.raises(ValueError, match="no train or eval records"):
        training_curves([{"kind": "note"}], tmp_path / "c.png")
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"kind": "train"}\nnot json\n{"kind": "train"}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: not a JSON record"):
        read_metrics(bad)
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("k", [3, 1000])
def test_confusion_png(tmp_path, k):
    rng = np.random.default_rng(0)
    confusion = rng.integers(0, 50, (k, k))
    confusion[0] = 0  # a class with no images: an empty row, not NaN
    out = confusion_png(confusion, [f"class {i}" for i in range(k)], tmp_path / "c.png", title="t")
    w, h = confusion_size(k)
    assert size_of(out) == (round(w * DPI), round(h * DPI))
    with Image.open(out) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # something was drawn


def test_confusion_png_checks_the_names(tmp_path):
    with pytest.raises(ValueError, match=r"shape \(2, 2\), but 3 class names"):
        confusion_png(np.eye(2, dtype=int), ["a", "b", "c"], tmp_path / "c.png")
