import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vitkit import load_pretrained
from vitkit.cli import main
from vitkit.evaluate import evaluate
from vitkit.predict import predict


def test_models_lists_variants_with_exact_counts(capsys):
    assert main(["models", "b16"]) == 0
    out = capsys.readouterr().out
    assert "vit_b16" in out and "86,567,656" in out and "17.56" in out
    assert "r50_vit_b16" in out and "98,659,112" in out
    assert "vit_s16" not in out


def test_create_convert_predict(tmp_path, capsys, caplog):
    tiny = ["--set", "img_size=32", "--set", "patch_size=8", "--set", "width=32", "--set", "depth=2",
            "--set", "heads=4", "--set", "mlp_dim=64", "--set", "num_classes=3"]  # fmt: skip
    assert main(["create", "vit_ti16", str(tmp_path / "m"), *tiny]) == 0
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "m.pth"), "--to", "timm"]) == 0
    # A timm state dict does not store the head count; width 32 is no named size, so it is given.
    assert main(["convert", str(tmp_path / "m.pth"), str(tmp_path / "m2"), "--set", "heads=4"]) == 0
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, mode in enumerate(["RGB", "L", "RGBA"]):
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).convert(mode).save(images / f"{i}.png")
    (images / "broken.jpg").write_bytes(b"<html>not an image</html>")
    capsys.readouterr()
    # An unreadable image does not stop the others; the exit status says one was not read.
    assert main(["predict", str(tmp_path / "m2"), str(images), "--topk", "2", "--format", "json"]) == 1
    results = json.loads(capsys.readouterr().out)
    assert "could not read 1 of 4 image(s)" in caplog.text
    assert [r["path"].rsplit("/", 1)[-1] for r in results] == ["0.png", "1.png", "2.png", "broken.jpg"]
    for r in results[:3]:
        assert len(r["labels"]) == 2 and set(r["labels"]) <= {"class_0", "class_1", "class_2"}
        assert 0 < r["probs"][1] <= r["probs"][0] < 1
    assert results[3]["labels"] == [] and "an HTML/XML page, not an image" in results[3]["error"]
    (images / "broken.jpg").unlink()  # every image read: exit 0
    assert main(["predict", str(tmp_path / "m2"), str(images), "--topk", "3", "--format", "json"]) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert (
        main(["predict", str(tmp_path / "m2"), str(images), "--topk", "3", "--format", "json", "--precision", "bf16"])
        == 0
    )
    bf16 = json.loads(capsys.readouterr().out)
    for a, b in zip(fp32[:3], bf16[:3], strict=True):  # bf16 rounds: close to fp32, not equal to it
        by_label = dict(zip(a["labels"], a["probs"], strict=True))
        np.testing.assert_allclose([by_label[n] for n in b["labels"]], b["probs"], atol=0.02, rtol=0)
    assert any(a["probs"] != b["probs"] for a, b in zip(fp32[:3], bf16[:3], strict=True))
    assert main(["predict", str(tmp_path / "m2"), str(images), "--format", "json", "--precision", "int8"]) == 0
    int8 = json.loads(capsys.readouterr().out)
    for a, b in zip(fp32[:3], int8[:3], strict=True):  # the blocks' dense layers in int8: close to fp32 too
        by_label = dict(zip(a["labels"], a["probs"], strict=True))
        np.testing.assert_allclose([by_label[n] for n in b["labels"]], b["probs"], atol=0.03, rtol=0)
    assert any(a["probs"] != b["probs"] for a, b in zip(fp32[:3], int8[:3], strict=True))


def test_convert_refuses_to_overwrite(tmp_path, capsys):
    tiny = ["--set", "img_size=16", "--set", "patch_size=8", "--set", "width=8", "--set", "depth=1",
            "--set", "heads=2", "--set", "mlp_dim=8"]  # fmt: skip
    assert main(["create", "vit_ti16", str(tmp_path / "a.pth"), "--to", "timm", *tiny]) == 0
    (tmp_path / "b.pth").write_bytes(b"precious")
    assert main(["convert", str(tmp_path / "a.pth"), str(tmp_path / "b.pth"), "--to", "timm"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "b.pth").read_bytes() == b"precious"


def test_errors_are_clear(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "missing"), "x.jpg"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["create", "vit_q99", str(tmp_path / "q")]) == 2
    assert "unknown model name 'vit_q99'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", "a", "b", "--to", "onnx"])


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "vitkit", "--help"], capture_output=True, text=True, check=True)
    assert "convert" in out.stdout and "predict" in out.stdout


TINY = ["--set", "img_size=16", "--set", "patch_size=4", "--set", "width=32", "--set", "depth=2",
        "--set", "heads=2", "--set", "mlp_dim=64", "--set", "num_classes=3"]  # fmt: skip


def test_predict_annotate(tmp_path, capsys):
    assert main(["create", "vit_ti16", str(tmp_path / "m"), *TINY]) == 0
    rng = np.random.default_rng(0)
    originals = {}
    for folder, mode in [("a", "RGB"), ("b", "L")]:
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / "0.png"
        Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).convert(mode).save(path)
        originals[path] = path.read_bytes()
    (tmp_path / "a" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "annotated"
    inputs = [str(tmp_path / "a"), str(tmp_path / "b")]
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "m"), *inputs, "--annotate", str(out), "--format", "json"]) == 1
    results = json.loads(capsys.readouterr().out)  # stdout stays pure JSON
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "0_1.png"]  # same names get a suffix; none for broken
    for path, copy in [(tmp_path / "a" / "0.png", out / "0.png"), (tmp_path / "b" / "0.png", out / "0_1.png")]:
        assert path.read_bytes() == originals[path]
        before = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        after = np.asarray(Image.open(copy), dtype=np.int16)
        assert after.shape == before.shape
        assert np.abs(after[:8, :40] - before[:8, :40]).mean() > 20  # the label box
        np.testing.assert_array_equal(after[60:], before[60:])  # the rest is untouched
    assert results[0]["labels"] and results[1]["error"]

    assert main(["predict", str(tmp_path / "m"), *inputs, "--annotate", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "m"), *inputs, "--annotate", str(out), "--overwrite"]) == 1
    # The originals are never written, --overwrite or not.
    assert main(["predict", str(tmp_path / "m"), inputs[0], "--annotate", inputs[0], "--overwrite"]) == 2
    assert "is one of the input images" in capsys.readouterr().err


def test_eval_writes_a_report(tmp_path, capsys):
    pytest.importorskip("vitkit.data.loader")
    assert main(["create", "vit_ti16", str(tmp_path / "m"), *TINY]) == 0
    rng = np.random.default_rng(0)
    for name in ["ant", "bee", "cow"]:
        for split in ["train", "val"]:
            (tmp_path / "data" / split / name).mkdir(parents=True)
            for i in range(3):
                image = Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
                image.save(tmp_path / "data" / split / name / f"{i}.jpg")
    capsys.readouterr()
    args = ["eval", str(tmp_path / "m"), str(tmp_path / "data"), "--batch-size", "4", "--device", "cpu"]
    assert main([*args, "--json", "--out", str(tmp_path / "report")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["count"] == 9 and 0 <= metrics["top1"] <= 1 and metrics["top5"] == 1.0 and metrics["loss"] > 0
    assert list(metrics["per_class"]) == ["ant", "bee", "cow"]
    assert json.loads((tmp_path / "report" / "metrics.json").read_text()) == metrics
    assert {p.name for p in (tmp_path / "report").iterdir()} == {"metrics.json", "confusion.csv", "confusion.png"}
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "cow" in out and "skipped 0" in out
    assert main(["eval", str(tmp_path / "m"), "digits"]) == 2
    assert "10 classes, but the model has 3 outputs" in capsys.readouterr().err

    # --flip: the same numbers as the library's evaluation with flip=True, and not those without it.
    from vitkit.data import open_source

    assert main([*args, "--json", "--flip"]) == 0
    flipped = json.loads(capsys.readouterr().out)
    expected = evaluate(load_pretrained(tmp_path / "m"), open_source(str(tmp_path / "data"), "val"), flip=True)
    assert flipped["loss"] == pytest.approx(expected.loss, abs=1e-6) and flipped["top1"] == expected.top1
    assert flipped["loss"] != pytest.approx(metrics["loss"], abs=1e-4)


def test_predict_with_flip(tmp_path, capsys):
    assert main(["create", "vit_ti16", str(tmp_path / "m"), *TINY]) == 0
    path = tmp_path / "0.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(path)
    capsys.readouterr()
    outputs = {}
    for flag in ([], ["--flip"]):
        assert main(["predict", str(tmp_path / "m"), str(path), "--topk", "3", "--format", "json", *flag]) == 0
        outputs[bool(flag)] = json.loads(capsys.readouterr().out)[0]
    expected = predict(load_pretrained(tmp_path / "m"), [path], topk=3, flip=True)[0]
    assert outputs[True]["labels"] == expected.labels
    np.testing.assert_allclose(outputs[True]["probs"], expected.probs, atol=1e-6, rtol=0)
    assert not np.allclose(outputs[True]["probs"], outputs[False]["probs"], atol=1e-4)
