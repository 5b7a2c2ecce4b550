"""`vitkit analyze ...` end to end through the real `main([...])`: files written, and the JSON holding exactly what
the Python functions return for the same model and inputs."""

import json

import numpy as np
import pytest
from PIL import Image
from randomized import randomized

import vitkit
from vitkit.analysis import (
    attention_maps,
    filter_components,
    load_images,
    mean_attention_distance,
    posembed_similarity,
    sample_batches,
)
from vitkit.cli import main
from vitkit.data import open_source

BASE = dict(patch_size=8, width=32, depth=2, heads=2, mlp_dim=64, num_classes=3)
CONFIGS = {
    "token": dict(BASE, img_size=(16, 32)),  # a non-square grid, 2x4
    "gap": dict(BASE, img_size=(16, 16), pool="gap", class_token=False),
    "hybrid": dict(BASE, img_size=(32, 32), patch_size=2, hybrid=(), stem_width=32),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    paths = {}
    for kind, kw in CONFIGS.items():
        paths[kind] = vitkit.save_pretrained(randomized(vitkit.ViTConfig(**kw)), root / kind)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 70, 3), dtype=np.uint8)).save(images / "wide.png")  # non-square
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(images / "grey.png")
    return paths, sorted(images.iterdir())


def read(path):
    return json.loads(path.read_text())


@pytest.mark.parametrize("kind", ["token", "gap", "hybrid"])
def test_attention(saved, tmp_path, capsys, kind):
    models, images = saved
    out = tmp_path / "out"
    argv = ["analyze", "attention", str(models[kind]), *map(str, images), "--out", str(out)]
    assert main([*argv, "--fusion", "max", "--discard", "0.25", "--layers", "0,-1", "--batch-size", "1"]) == 0
    names = ["attention.png", "attention.json", "attention_heads_0.png", "attention_heads_1.png"]
    assert all((out / n).stat().st_size > 0 for n in names)
    assert str(out / "attention.png") in capsys.readouterr().out
    record = read(out / "attention.json")
    model = vitkit.load_pretrained(models[kind])
    inputs, _ = load_images(model, images)
    maps = attention_maps(model, inputs, "max", 0.25, [0, -1], batch_size=1)
    assert record["grid"] == list(model.cfg.grid) and record["layers"] == [0, 1] and record["pool"] == model.cfg.pool
    assert [r["path"] for r in record["images"]] == [str(p) for p in images]
    for i, r in enumerate(record["images"]):
        np.testing.assert_array_equal(np.array(r["rollout"]), maps.rollout[i])
        np.testing.assert_array_equal(np.array(r["heads"]), maps.heads[i])
        assert np.array(r["heads"]).shape == (2, 2, *model.cfg.grid)
    # outputs are not replaced unless asked
    before = (out / "attention.json").read_bytes()
    assert main(argv) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (out / "attention.json").read_bytes() == before
    assert main([*argv, "--overwrite"]) == 0
    assert read(out / "attention.json")["layers"] == []


@pytest.mark.parametrize("kind", ["token", "gap", "hybrid"])
def test_distance(saved, tmp_path, kind):
    models, _ = saved
    out = tmp_path / "out"
    argv = ["analyze", "distance", str(models[kind]), "digits", "--images", "10", "--batch-size", "4"]
    assert main([*argv, "--out", str(out)]) == 0
    assert (out / "distance.png").stat().st_size > 0
    record = read(out / "distance.json")
    model = vitkit.load_pretrained(models[kind])
    expected = mean_attention_distance(model, sample_batches(model, open_source("digits", "val"), 10, 4, seed=0))
    np.testing.assert_array_equal(np.array(record["distance_px"]), expected)
    assert record["images"] == 10 and record["patch_px"] == model.cfg.stride and expected.shape == (2, 2)


def test_posembed(saved, tmp_path):
    models, _ = saved
    out = tmp_path / "out"
    assert main(["analyze", "posembed", str(models["token"]), "--size", "32", "24", "--out", str(out)]) == 0
    model = vitkit.load_pretrained(models["token"])
    native, resampled = read(out / "posembed.json"), read(out / "posembed_32x24.json")
    assert (out / "posembed.png").stat().st_size > 0 and (out / "posembed_32x24.png").stat().st_size > 0
    np.testing.assert_array_equal(np.array(native["similarity"]), posembed_similarity(model))
    np.testing.assert_array_equal(np.array(resampled["similarity"]), posembed_similarity(model, (4, 3)))
    assert native["grid"] == [2, 4] and resampled["grid"] == [4, 3]
    gap_out = tmp_path / "gap"
    assert main(["analyze", "posembed", str(models["gap"]), "--img-size", "24", "--out", str(gap_out)]) == 0
    assert read(gap_out / "posembed.json")["grid"] == [2, 2] and read(gap_out / "posembed_24x24.json")["grid"] == [3, 3]


def test_filters(saved, tmp_path, capsys):
    models, _ = saved
    out = tmp_path / "out"
    assert main(["analyze", "filters", str(models["token"]), "--count", "5", "--out", str(out)]) == 0
    record = read(out / "filters.json")
    components, ratios = filter_components(vitkit.load_pretrained(models["token"]), 5)
    np.testing.assert_array_equal(np.array(record["components"]), components)
    np.testing.assert_array_equal(np.array(record["explained_variance_ratio"]), ratios)
    assert record["count"] == 5 and (out / "filters.png").stat().st_size > 0
    capsys.readouterr()
    hybrid_out = tmp_path / "hybrid"
    assert main(["analyze", "filters", str(models["hybrid"]), "--out", str(hybrid_out)]) == 2
    err = capsys.readouterr().err
    assert "vitkit analyze: error:" in err and "is a hybrid" in err and "ResNet v2 stem" in err
    assert not hybrid_out.exists()


def test_bad_arguments_are_clear(saved, tmp_path, capsys):
    models, images = saved
    model, out = str(models["token"]), str(tmp_path)
    assert main(["analyze", "attention", model, str(images[0]), "--layers", "5", "--out", out]) == 2
    assert "layer 5 is out of range for a model with 2 blocks" in capsys.readouterr().err
    assert main(["analyze", "attention", model, str(images[0]), "--discard", "1.5", "--out", out]) == 2
    assert "--discard 1.5" in capsys.readouterr().err
    assert main(["analyze", "posembed", model, "--img-size", "20", "--out", out]) == 2
    assert "not a positive multiple of the model's token stride 8" in capsys.readouterr().err
    assert main(["analyze", "attention", model, str(tmp_path / "missing.png"), "--out", out]) == 2
    assert "no such file" in capsys.readouterr().err
