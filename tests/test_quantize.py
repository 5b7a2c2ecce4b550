"""int8 inference (`vitkit.models.quantize`): the layers' error stays within what their quantization steps allow,
the model copy leaves the original alone, and the commands that classify accept it."""

import numpy as np
import pytest
import torch
from randomized import randomized

import vitkit
from vitkit.evaluate import evaluate, inference_model
from vitkit.models.linear import Linear
from vitkit.models.quantize import Int8Linear, quantize_int8, quantize_torch_int8, reduce_range


def error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The largest |int8 - fp32| each output of x @ w.T can have: every input off by up to half its step (one
    step for the tensor, 7-bit or 8-bit), every weight by half its row's step, and both at once."""
    levels = 127 if reduce_range() else 255
    step_x = (x.max().clamp_min(0) - x.min().clamp_max(0)) / levels
    step_w = w.abs().amax(dim=1) / 127  # (out,)
    x_abs, w_abs = x.abs().double(), w.abs().double()
    per_weight = x_abs.sum(-1, keepdim=True) * step_w.double() / 2  # (M, out)
    per_input = step_x.double() / 2 * w_abs.sum(-1)  # (out,)
    both = x.shape[-1] * step_x.double() * step_w.double() / 4
    return (per_weight + per_input + both).float() * 1.001 + 1e-5


@pytest.mark.parametrize("case", ["gaussian", "outlier_row", "positive_inputs_full_weights"])
def test_int8_linear_stays_within_its_quantization_steps(case):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 256, generator=gen)
    w = torch.randn(64, 256, generator=gen) * 0.05
    b = torch.randn(64, generator=gen)
    if case == "outlier_row":  # one scale for the whole matrix would make the other rows' steps 100x too coarse
        w[3] *= 100
    if case == "positive_inputs_full_weights":  # post-GELU-like inputs against weights at +-127: the 16-bit pair
        x = x.abs() * 3  # sums of CPUs without VNNI saturate unless the inputs are quantized to 7 bits
        w = torch.sign(w) * 0.5
    exact = x @ w.T + b
    with torch.no_grad():
        got = Int8Linear(w, b)(x)
    error = (got - exact).abs()
    assert (error <= error_bound(x, w)).all(), (error / error_bound(x, w)).max()
    assert error.max() > 0  # it did compute in int8
    rows = [r for r in range(64) if r != 3]
    assert error[:, rows].max() < 0.5 * error_bound(x, w)[:, rows].max()


def test_int8_linear_keeps_its_weight_to_half_a_step_and_refuses_gradients():
    w = torch.randn(8, 32)
    layer = Int8Linear(w, None)
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((layer.dequantized_weight() - w).abs() <= step / 2 + 1e-7).all()
    assert "int8" in repr(layer)
    with pytest.raises(RuntimeError, match="inference"):
        layer(torch.randn(2, 32, requires_grad=True))


def tiny(num_classes=5):
    cfg = vitkit.models.resolve_config(
        "vit_ti16", img_size=32, patch_size=8, width=64, depth=2, heads=4, mlp_dim=128, num_classes=num_classes
    )
    model = randomized(cfg, seed=1)
    with torch.no_grad():  # weights of a trained model's scale, so the logits are not dominated by noise
        for p in model.parameters():
            p.mul_(0.25)
    return model


def test_quantize_int8_copies_the_blocks_dense_layers_and_leaves_the_model_alone():
    model = tiny()
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(x)
        quantized = quantize_int8(model)
        after, got = model(x), quantized(x)
    torch.testing.assert_close(after, before, atol=0, rtol=0)  # the original still fp32, untouched
    assert sum(isinstance(m, Linear) for m in model.modules()) == 4 * 2 + 1
    assert sum(isinstance(m, Int8Linear) for m in quantized.modules()) == 4 * 2  # qkv, proj, fc1, fc2 per block
    assert isinstance(quantized.head, Linear)  # the head stays fp32
    relative = ((got - before).norm() / before.norm()).item()
    assert 0 < relative < 0.03, relative
    assert (got.argmax(-1) == before.argmax(-1)).float().mean() >= 5 / 6
    with pytest.raises(TypeError, match="no transformer blocks"):
        quantize_int8(torch.nn.Linear(3, 3))


def test_pytorch_quantization_of_a_peer_gives_the_same_answers():
    model = tiny()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = quantize_int8(model)(x), quantize_torch_int8(model)(x)
    # The same scheme, except that PyTorch's also quantizes the head: close, not equal.
    np.testing.assert_allclose(theirs, ours, atol=0.05 * ours.abs().max().item(), rtol=0)


def test_inference_model_takes_int8_on_cpu_only_and_evaluate_runs_it(tmp_path):
    from test_evaluate import image_folder

    from vitkit.data import open_source
    from vitkit.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

    model = tiny(3)
    model.preprocess = Preprocess((32, 32), IMAGENET_MEAN, IMAGENET_STD, "shorter", 1.0, "bicubic")
    assert inference_model(model, "cpu", "fp32") is model and not model.training
    with pytest.raises(ValueError, match="int8 runs on CPU, not on 'cuda'"):
        inference_model(model, "cuda", "int8")
    image_folder(tmp_path)
    fp32 = evaluate(model, open_source(str(tmp_path), "val"), batch_size=5)
    int8 = evaluate(model, open_source(str(tmp_path), "val"), batch_size=5, precision="int8")
    assert int8.count == fp32.count == 12
    assert int8.loss == pytest.approx(fp32.loss, abs=0.03) and int8.loss != fp32.loss
    assert all(isinstance(m, Linear) for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
