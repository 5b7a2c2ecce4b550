"""The fast fp32 CPU kernel of `Linear` against `F.linear`, and gradient checkpointing against plain backward."""

import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.models.linear import Linear, reference_kernels

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not built in")


def _grads(layer: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_()
    layer.zero_grad()
    out = layer(x)
    out.backward(grad_out)
    return out.detach(), x.grad, layer.weight.grad, layer.bias.grad


@pytest.mark.parametrize("shape", [(7, 24), (3, 401, 24)])  # 1203 rows: more than two weight-gradient chunks
def test_onednn_linear_matches_f_linear(shape):
    torch.manual_seed(0)
    layer = Linear(24, 40)
    x, g = torch.randn(shape), torch.randn(*shape[:-1], 40)
    fast = _grads(layer, x, g)
    with reference_kernels():
        ref = _grads(layer, x, g)
    for a, b, name in zip(fast, ref, ["out", "grad x", "grad weight", "grad bias"], strict=True):
        assert not torch.equal(a, torch.zeros_like(a)), name
        # Sums over up to 1203 rows: fp32 rounding grows with the magnitude (both kernels are that far from fp64).
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item(), msg=name)


def test_bias_only_training_still_gets_gradients():
    layer = Linear(8, 4)
    layer.weight.requires_grad_(False)
    layer(torch.randn(5, 8)).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((4,), 5.0))


def test_other_dtypes_and_autocast_take_f_linear_exactly():
    torch.manual_seed(0)
    layer, x = Linear(16, 8), torch.randn(4, 16)
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    layer_bf16 = Linear(16, 8).to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    assert torch.equal(layer_bf16(xb), F.linear(xb, layer_bf16.weight, layer_bf16.bias))


def test_whole_model_logits_and_gradients_agree_with_reference():
    torch.manual_seed(0)
    model = vitkit.create_model("vit_ti16", img_size=32, patch_size=8, num_classes=10, representation_size=48)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])

    def run():
        model.zero_grad()
        logits = model(x)
        F.cross_entropy(logits, y).backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    fast_logits, fast_grads = run()
    with reference_kernels():
        ref_logits, ref_grads = run()
    torch.testing.assert_close(fast_logits, ref_logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.inference_mode():  # the no-grad path
        torch.testing.assert_close(model(x), ref_logits, rtol=1e-5, atol=1e-5)


def _saved_bytes_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, list[torch.Tensor]]:
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad()
    torch.manual_seed(1)  # the same dropout and stochastic-depth draws in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).square().mean()
    loss.backward()
    return sum(saved), [p.grad.clone() for p in model.parameters()]


def test_grad_checkpointing_same_gradients_less_memory():
    torch.manual_seed(0)
    model = vitkit.create_model(
        "vit_ti16", img_size=32, patch_size=8, depth=6, num_classes=5, dropout=0.1, drop_path=0.2
    )
    model.train()
    x = torch.randn(3, 3, 32, 32)
    plain_bytes, plain = _saved_bytes_and_grads(model, x)
    model.set_grad_checkpointing()
    ckpt_bytes, ckpt = _saved_bytes_and_grads(model, x)
    for a, b in zip(ckpt, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Outside the blocks, only each block's input is kept; the blocks' internals are recomputed in backward.
    assert ckpt_bytes < plain_bytes / 4, (ckpt_bytes, plain_bytes)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fused_gelu_matches_two_passes(approximate):
    torch.manual_seed(0)
    layer, x = Linear(32, 64), torch.randn(2, 9, 32)
    with torch.inference_mode():
        fused = layer.forward_gelu(x, approximate)
        with reference_kernels():
            ref = F.gelu(F.linear(x, layer.weight, layer.bias), approximate=approximate)
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    with reference_kernels(), torch.inference_mode():  # the reference path is bit-exact with the two passes
        assert torch.equal(layer.forward_gelu(x, approximate), ref)
