"""ONNX export: onnxruntime against PyTorch at several batches and sizes, the metadata record, the CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from randomized import randomized

import vitkit
from vitkit.cli import main
from vitkit.export import export_onnx
from vitkit.models.posembed import resample_pos_embed, resample_pos_embed_traced

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")

BASE = dict(width=32, depth=2, heads=4, mlp_dim=64, num_classes=5)
MODELS = {
    # learned position embeddings, bicubic resampling, antialiased when the grid shrinks (timm)
    "token": vitkit.ViTConfig(img_size=(32, 32), patch_size=8, **BASE),
    # average pooling without a class token, fixed sin-cos embeddings computed for each grid
    "gap": vitkit.ViTConfig(img_size=(32, 24), patch_size=8, pool="gap", class_token=False, pos_embed="sincos", **BASE),
    # ResNet root (stride 4) + patch 2, learned embeddings resampled bilinearly with aligned corners (the official
    # zoom); average pooling over a class token kept apart
    "hybrid": vitkit.ViTConfig(
        img_size=(32, 32), patch_size=2, hybrid=(), stem_width=32, pool="gap", pos_interp="bilinear", **BASE
    ),
}
BATCHES = (1, 2, 5)
# The export size; a larger, non-square one; one whose grid shrinks in height (the antialiased branch).
SIZES = ((32, 32), (48, 24), (16, 40))
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """kind -> (model, its ONNX file), exported on first use (an export takes seconds)."""
    out = tmp_path_factory.mktemp("onnx")
    cache = {}

    def get(kind):
        if kind not in cache:
            model = randomized(MODELS[kind].replace(dynamic_img_size=True), seed=1)
            cache[kind] = (model, export_onnx(model, out / f"{kind}.onnx", dynamic_size=True))
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", list(MODELS))
def test_onnxruntime_matches_torch_at_any_batch_and_size(exported, kind):
    model, path = exported(kind)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    batch_dim, _, h_dim, w_dim = session.get_inputs()[0].shape
    assert all(isinstance(d, str) for d in (batch_dim, h_dim, w_dim))  # symbolic, not baked in
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for batch in BATCHES:
        for size in SIZES:
            x = torch.randn(batch, 3, *size, generator=gen)
            with torch.no_grad():
                expected = model(x).numpy()
            (logits,) = session.run(None, {"images": x.numpy()})
            assert logits.shape == (batch, 5)
            worst = max(worst, float(np.abs(logits - expected).max()))
            # The logits differ between images by far more than the tolerance (so the comparison says something).
            assert np.abs(expected - expected.mean(0)).max() > 10 * TOLERANCE or batch == 1
    print(f"{kind}: max abs logit difference {worst:.2e}")
    assert worst <= TOLERANCE


def test_traced_resampling_equals_eager():
    """The export path (no Python branch on the size) gives the eager numbers, bit for bit, in PyTorch."""
    pos = torch.randn(1, 1 + 4 * 6, 8)
    for grid in [(4, 6), (6, 9), (3, 8), (2, 3)]:  # same, larger, shrinking in one side, shrinking in both
        for mode, antialias in [("bicubic", True), ("bicubic", False), ("bilinear", False)]:
            eager = resample_pos_embed(pos, grid, (4, 6), 1, mode, antialias)
            traced = resample_pos_embed_traced(pos, grid, (4, 6), 1, mode, antialias)
            assert torch.equal(eager, traced), (grid, mode, antialias)


def test_metadata_records_preprocessing_classes_and_opset(tmp_path):
    onnx = pytest.importorskip("onnx")
    from vitkit.onnx_model import OnnxModel

    model = randomized(MODELS["token"], seed=2)
    model.classes = ["ant", "bee", "cat", "dog", "eel"]
    model.preprocess = vitkit.Preprocess((32, 32), (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), "shorter", 0.875, "bicubic")
    path = export_onnx(model, tmp_path / "m.onnx", opset=19)
    proto = onnx.load(str(path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [19]
    record = json.loads({p.key: p.value for p in proto.metadata_props}["vitkit"])
    assert record["preprocess"] == model.preprocess.to_dict()
    assert record["classes"] == model.classes
    assert record["onnx"]["opset"] == 19 and record["onnx"]["dynamic_size"] is False
    # Without --dynamic-size the height and width are fixed, the batch is not.
    assert [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == ["batch", 3, 32, 32]
    runner = OnnxModel(path)
    assert runner.preprocess == model.preprocess and runner.classes == model.classes
    assert runner.cfg == model.cfg
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), model(x), atol=TOLERANCE, rtol=0)


def test_export_refuses_bad_input(tmp_path):
    model = randomized(MODELS["token"])
    (tmp_path / "taken.onnx").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        export_onnx(model, tmp_path / "taken.onnx")
    assert (tmp_path / "taken.onnx").read_bytes() == b"precious"
    with pytest.raises(ValueError, match="opset 17: expected 18 or newer"):
        export_onnx(model, tmp_path / "new.onnx", opset=17)
    from vitkit.onnx_model import OnnxModel

    with pytest.raises(FileNotFoundError, match=r"missing\.onnx: no such file"):
        OnnxModel(tmp_path / "missing.onnx")


def test_cli_export_and_predict_with_onnxruntime(tmp_path, capsys):
    model = randomized(MODELS["token"].replace(dynamic_img_size=True), seed=3)
    model.classes = ["ant", "bee", "cat", "dog", "eel"]
    vitkit.save_pretrained(model, tmp_path / "m")
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate([(40, 50), (64, 64)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(images / f"{i}.png")
    (images / "broken.jpg").write_bytes(b"<html>not an image</html>")
    out = tmp_path / "m.onnx"
    out.write_bytes(b"precious")
    assert main(["export", str(tmp_path / "m"), str(out), "--dynamic-size"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert main(["export", str(tmp_path / "m"), str(out), "--dynamic-size", "--overwrite"]) == 0
    assert "any height and width divisible by 8" in capsys.readouterr().out

    results = {}
    for backend, source in [("torch", tmp_path / "m"), ("onnx", out)]:
        args = ["predict", str(source), str(images), "--topk", "3", "--format", "json", "--backend", backend]
        assert main(args) == 1  # broken.jpg was not read, on either backend
        results[backend] = json.loads(capsys.readouterr().out)
    torch_results, onnx_results = results["torch"], results["onnx"]
    assert [r["path"] for r in onnx_results] == [r["path"] for r in torch_results]
    for a, b in zip(torch_results, onnx_results, strict=True):
        assert a["labels"] == b["labels"] and a["error"] == b["error"]
        np.testing.assert_allclose(b["probs"], a["probs"], atol=1e-5, rtol=0)
    assert onnx_results[0]["labels"][0] in model.classes and len(onnx_results[0]["probs"]) == 3
    assert "an HTML/XML page, not an image" in onnx_results[2]["error"]

    assert main(["predict", str(out), str(images), "--backend", "onnx", "--set", "num_classes=3"]) == 2
    assert "export again" in capsys.readouterr().err
    assert main(["predict", str(out), str(images)]) == 2
    assert "is an ONNX graph; run it with --backend onnx" in capsys.readouterr().err
    assert main(["predict", str(out), str(images), "--backend", "onnx", "--precision", "bf16"]) == 2
    assert "precision 'bf16' needs a torch model" in capsys.readouterr().err
