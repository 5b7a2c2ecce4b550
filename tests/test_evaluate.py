import csv
import json
import logging

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from randomized import randomized

from vitkit.evaluate import (
    EvalResult,
    Meter,
    _warn_slow_bf16,
    autocast,
    class_scores,
    evaluate,
    summary,
    write_report,
)
from vitkit.models import resolve_config
from vitkit.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

# 7 classes: top-5 is a real subset. Row by row: the true class ranks 1st, 3rd, 6th, 1st, 2nd, 5th.
LOGITS = torch.tensor(
    [
        [5.0, 1, 0, 0, 0, 0, 0],
        [0, 3, 4, 5, 0, 0, 0],
        [6, 5, 4, 3, 2, 1, 0],
        [0, 0, 0, 0, 0, 0, 9],
        [0, 0, 2, 0, 3, 0, 0],
        [0, 1, 2, 3, 4, 0, -1],
    ]
)
LABELS = torch.tensor([0, 1, 5, 6, 2, 1])


def test_meter_counts_exactly():
    meter = Meter(7)
    meter.update(LOGITS[:4], LABELS[:4])
    meter.update(LOGITS[4:], LABELS[4:])
    r = meter.result([f"c{i}" for i in range(7)])
    assert r.count == 6
    assert r.top1 == 2 / 6
    assert r.top5 == 5 / 6  # all but the row whose class ranks 6th
    assert r.loss == pytest.approx(F.cross_entropy(LOGITS, LABELS).item(), abs=1e-6)
    expected = np.zeros((7, 7), dtype=np.int64)
    for true, pred in [(0, 0), (1, 3), (5, 0), (6, 6), (2, 4), (1, 4)]:
        expected[true, pred] += 1
    np.testing.assert_array_equal(r.confusion, expected)
    assert r.per_class == [1.0, 0.0, 0.0, None, None, 0.0, 1.0]
    assert r.support == [1, 2, 1, 0, 0, 1, 1]
    d = r.to_dict()
    assert d["per_class"]["c3"] is None and d["per_class"]["c6"] == 1.0
    json.dumps(d, allow_nan=False)  # NaN-free


def test_meter_top5_with_fewer_classes():
    meter = Meter(3)
    meter.update(torch.tensor([[0.0, 1, 2], [2, 1, 0]]), torch.tensor([0, 0]))
    r = meter.result(["a", "b", "c"])
    assert (r.top1, r.top5) == (0.5, 1.0)  # top-5 of 3 classes is all of them


def test_meters_summed_equal_one_meter():
    rng = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(50, 7, generator=rng), torch.randint(0, 7, (50,), generator=rng)
    whole, parts = Meter(7), [Meter(7), Meter(7)]
    for i in range(0, 50, 8):
        whole.update(logits[i : i + 8], labels[i : i + 8])
        parts[(i // 8) % 2].update(logits[i : i + 8], labels[i : i + 8])
    for name in ("confusion", "top5_hits", "loss_sum"):  # what all_reduce sums
        setattr(parts[0], name, getattr(parts[0], name) + getattr(parts[1], name))
    a, b = whole.result(list("abcdefg")), parts[0].result(list("abcdefg"))
    assert (a.top1, a.top5, a.count) == (b.top1, b.top5, b.count)
    assert a.loss == pytest.approx(b.loss, rel=1e-12)
    np.testing.assert_array_equal(a.confusion, b.confusion)


def test_all_reduce_in_a_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        meter = Meter(7)
        meter.update(LOGITS, LABELS)
        meter.all_reduce()  # one rank: the sum is itself
        assert meter.result(list("abcdefg")).top5 == 5 / 6
    finally:
        dist.destroy_process_group()


def test_meter_refuses_an_empty_result():
    with pytest.raises(ValueError, match="no images"):
        Meter(3).result(["a", "b", "c"])


def test_write_report(tmp_path):
    confusion = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 4]])
    result = EvalResult(0.7, 1.0, 0.5, 10, ["cat", "dog", "eel"], confusion, [0.75, None, 4 / 6], [("x.jpg", "bad")])
    paths = write_report(result, tmp_path / "report")
    assert [p.name for p in paths] == ["metrics.json", "confusion.csv", "confusion.png", "skipped.tsv"]
    assert (tmp_path / "report" / "skipped.tsv").read_text() == "x.jpg\tbad\n"
    metrics = json.loads(paths[0].read_text())
    assert metrics == {
        "top1": 0.7,
        "top5": 1.0,
        "loss": 0.5,
        "count": 10,
        "per_class": {"cat": 0.75, "dog": None, "eel": 4 / 6},
        "skipped": [{"where": "x.jpg", "reason": "bad"}],
    }
    rows = list(csv.reader(paths[1].open()))
    assert rows[0][1:] == ["cat", "dog", "eel"]
    assert [r[0] for r in rows[1:]] == ["cat", "dog", "eel"]
    np.testing.assert_array_equal(np.array([r[1:] for r in rows[1:]], dtype=int), confusion)
    with Image.open(paths[2]) as image:
        assert image.format == "PNG"
    text = summary(result)
    assert "top-1    70.00%" in text and "dog" in text and "skipped 1" in text and "top-3" in text


def tiny_model(num_classes: int):
    cfg = resolve_config(
        "vit_ti16", img_size=16, patch_size=4, width=32, depth=2, heads=2, mlp_dim=64, num_classes=num_classes
    )
    model = randomized(cfg)
    # A centre-cropping preprocessing, so a loader that ignored it would be caught.
    model.preprocess = Preprocess((16, 16), IMAGENET_MEAN, IMAGENET_STD, "shorter", 0.875, "bicubic")
    return model


def image_folder(root, classes=("ant", "bee", "cow"), per_class=(4, 3, 5)):
    """root/val/<class>/<i>.png of assorted sizes and modes; returns [(path, label)] in class order."""
    rng = np.random.default_rng(0)
    items = []
    for label, (name, n) in enumerate(zip(classes, per_class, strict=True)):
        (root / "train" / name).mkdir(parents=True)
        (root / "val" / name).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (20 + 3 * i, 24 + 2 * label, 3), dtype=np.uint8)
            image = Image.fromarray(pixels).convert("L" if i == 1 else "RGB")
            for split in ("train", "val"):
                image.save(root / split / name / f"{i}.png")
            items.append((root / "val" / name / f"{i}.png", label))
    return items


def preprocessed(model, items) -> torch.Tensor:
    """The images of `items` ([(path, label)]) through the model's own preprocessing, one by one."""
    inputs = []
    for path, _ in items:
        with Image.open(path) as image:
            inputs.append(model.preprocess(image))
    return torch.stack(inputs)


def test_evaluate_matches_a_manual_loop(tmp_path):
    pytest.importorskip("vitkit.data.loader")
    from vitkit.data import open_source

    items = image_folder(tmp_path)
    (tmp_path / "val" / "bee" / "broken.png").write_bytes(b"not an image")
    model = tiny_model(3)
    with torch.no_grad():
        logits = model(preprocessed(model, items))
    labels = torch.tensor([label for _, label in items])

    result = evaluate(model, open_source(str(tmp_path), "val"), batch_size=5)
    assert result.classes == ["ant", "bee", "cow"]
    assert result.count == len(items)
    assert result.top1 == (logits.argmax(-1) == labels).float().mean().item()
    assert result.loss == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-5)
    expected = np.zeros((3, 3), dtype=np.int64)
    np.add.at(expected, (labels.numpy(), logits.argmax(-1).numpy()), 1)
    np.testing.assert_array_equal(result.confusion, expected)
    assert result.top5 == 1.0
    assert len(result.skipped) == 1 and "broken.png" in result.skipped[0][0]

    bf16 = evaluate(model, open_source(str(tmp_path), "val"), batch_size=8, precision="bf16")
    assert bf16.count == len(items) and bf16.loss == pytest.approx(result.loss, abs=0.05)


def test_flip_averages_the_probabilities_of_the_mirror_images():
    model = tiny_model(5).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(class_scores(model, x), model(x))
        scores = class_scores(model, x, flip=True)
        mirror = torch.stack([image[:, :, torch.arange(15, -1, -1)] for image in x])  # columns reversed by hand
        mean = (model(x).softmax(-1) + model(mirror).softmax(-1)) / 2
        torch.testing.assert_close(scores.softmax(-1), mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(scores.exp().sum(-1), torch.ones(4), atol=1e-6, rtol=0)  # log-probabilities
        assert not torch.allclose(mean, model(x).softmax(-1), atol=1e-3)  # the mirror images did count
        symmetric = torch.cat([x[..., :8], x[..., :8].flip(-1)], dim=-1)  # each image its own mirror image
        torch.testing.assert_close(class_scores(model, symmetric, flip=True), model(symmetric).log_softmax(-1))
        # Confident logits 200 apart: an fp32 softmax underflows to 0, the scores stay finite.
        sure = class_scores(lambda t: torch.tensor([[200.0, 0.0]]).expand(len(t), 2), x, flip=True)
        assert torch.isfinite(sure).all() and sure[0, 1] == pytest.approx(-200, abs=1e-3)


def test_evaluate_with_flip_matches_a_manual_loop(tmp_path):
    pytest.importorskip("vitkit.data.loader")
    from vitkit.data import open_source

    items = image_folder(tmp_path)
    model = tiny_model(3)
    x = preprocessed(model, items)
    with torch.no_grad():
        probs = (model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2
    labels = torch.tensor([label for _, label in items])
    result = evaluate(model, open_source(str(tmp_path), "val"), batch_size=5, flip=True)
    assert result.top1 == (probs.argmax(-1) == labels).float().mean().item()
    assert result.loss == pytest.approx(F.nll_loss(probs.log(), labels).item(), abs=1e-5)
    plain = evaluate(model, open_source(str(tmp_path), "val"), batch_size=5)
    assert plain.loss != pytest.approx(result.loss, abs=1e-4)


def test_evaluate_checks_the_classes(tmp_path):
    pytest.importorskip("vitkit.data.loader")
    from vitkit.data import open_source

    image_folder(tmp_path)
    with pytest.raises(ValueError, match=r"3 classes, but the model has 4 outputs"):
        evaluate(tiny_model(4), open_source(str(tmp_path), "val"))


def test_evaluate_needs_labels(tmp_path):
    pytest.importorskip("vitkit.data.loader")
    from vitkit.data import open_source

    (tmp_path / "infer" / "ant").mkdir(parents=True)
    for path in (tmp_path / "infer" / "ant" / "0.png", tmp_path / "infer" / "loose.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match=r"1 unlabelled image\(s\)"):
        evaluate(tiny_model(1), open_source(str(tmp_path), "infer"))


@pytest.mark.parametrize("native_bf16", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_runs_and_warns_once(native_bf16, monkeypatch, caplog):
    monkeypatch.setattr("vitkit.evaluate.onednn_matmul", lambda dtype: native_bf16)
    _warn_slow_bf16.cache_clear()
    with caplog.at_level(logging.WARNING, logger="vitkit"):
        for _ in range(2):
            with autocast("cpu", "bf16"):
                assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    warnings = [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(warnings) == (0 if native_bf16 else 1)
    assert native_bf16 or "--set train.precision=fp32" in warnings[0]
    _warn_slow_bf16.cache_clear()


@pytest.mark.parametrize(
    ("device", "avx512_bf16", "amx", "cuda_bf16", "want"),
    [
        ("cpu", False, False, None, "fp32"),  # AVX2, or AVX-512 without bf16 instructions: bf16 is emulated
        ("cpu", True, False, None, "bf16"),
        ("cpu", False, True, None, "bf16"),
        ("cuda", False, False, True, "bf16"),
        ("cuda:1", False, False, False, "fp16"),  # a GPU without bf16 (before Ampere)
    ],
)
def test_auto_precision_picks_native_bf16_else_fp32_on_cpu_and_fp16_on_gpu(
    device, avx512_bf16, amx, cuda_bf16, want, monkeypatch
):
    from vitkit.evaluate import auto_precision

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    assert auto_precision(device) == want
