"""The fast CPU kernels (`Linear`'s oneDNN path, the native fp32 and bf16 attention, the explicit bf16 attention)
against PyTorch's defaults and fp64, and gradient checkpointing against plain backward."""

import logging
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import vitkit
from vitkit.models import kernels, linear, native
from vitkit.models.kernels import attention, max_pool, reference_kernels
from vitkit.models.linear import Linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not built in")


def _grads(layer: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_()
    layer.zero_grad()
    out = layer(x)
    out.backward(grad_out)
    return out.detach(), x.grad, layer.weight.grad, layer.bias.grad


@pytest.fixture
def onednn_fp32(monkeypatch):
    """`Linear`'s fp32 oneDNN path on wherever oneDNN is built in. `onednn_matmul` leaves it off on CPUs without
    AVX-512, where MKL is faster, but the path's numerics are checked on every machine."""
    original = linear.onednn_matmul
    monkeypatch.setattr(linear, "onednn_matmul", lambda dtype: dtype == torch.float32 or original(dtype))


def _spy_onednn(monkeypatch) -> list[int]:
    calls, original = [], linear._onednn
    monkeypatch.setattr(linear, "_onednn", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize("rows", [(7,), (3, 401)])  # 1203 rows: more than two weight-gradient chunks
@pytest.mark.parametrize("features", [(24, 40), (40, 24)])  # the weight gradient's two operand orders
@pytest.mark.parametrize("mkl_weight_grad", [False, True])  # oneDNN's chunks, or MKL's sgemm (a Zen 4)
def test_onednn_linear_matches_f_linear(rows, features, mkl_weight_grad, onednn_fp32, monkeypatch):
    monkeypatch.setattr(linear, "mkl_weight_grad", lambda: mkl_weight_grad)
    torch.manual_seed(0)
    layer = Linear(*features)
    x, g = torch.randn(*rows, features[0]), torch.randn(*rows, features[1])
    calls = _spy_onednn(monkeypatch)
    fast = _grads(layer, x, g)
    assert len(calls) >= (2 if mkl_weight_grad else 3)  # forward, input gradient[, weight gradient]
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


@pytest.mark.skipif(
    not kernels.onednn_matmul(torch.bfloat16), reason="oneDNN computes no bf16 on this CPU (it needs AVX-512)"
)
def test_bf16_inference_linear_runs_on_onednn_with_the_gelu_fused(monkeypatch):
    torch.manual_seed(0)
    layer = Linear(96, 160).to(torch.bfloat16)
    x = torch.randn(3, 50, 96).bfloat16()
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    calls = _spy_onednn(monkeypatch)
    with torch.inference_mode():
        plain, fused = layer(x), layer.forward_gelu(x)
        two_passes = F.gelu(F.linear(x, layer.weight, layer.bias))
    assert calls == [1] and plain.dtype == fused.dtype == torch.bfloat16
    for out, want in [(plain, exact), (fused, F.gelu(exact))]:
        # bf16 keeps 8 bits: rounding once errs by half a unit of the last place, at most 2^-8 of the value.
        err = (out.double() - want).abs()
        assert (err <= want.abs() * 2**-8 + 1e-6).all(), err.max()
    # The two-pass GELU rounds twice (the product, then the GELU); the fused one rounds once.
    fused_err, two_pass_err = (fused.double() - F.gelu(exact)).abs(), (two_passes.double() - F.gelu(exact)).abs()
    assert fused_err.mean() < 0.9 * two_pass_err.mean(), (fused_err.mean(), two_pass_err.mean())


def test_cpus_where_onednn_is_slower_or_refuses_take_f_linear_exactly(monkeypatch):
    monkeypatch.setattr(linear, "onednn_matmul", lambda dtype: False)  # an AVX2-only CPU
    calls = _spy_onednn(monkeypatch)
    torch.manual_seed(0)
    layer, x = Linear(16, 8), torch.randn(4, 16)
    want = F.linear(x, layer.weight, layer.bias)
    assert torch.equal(layer(x), want) and torch.equal(layer.forward_gelu(x), F.gelu(want))
    with torch.inference_mode():
        layer_bf16, xb = Linear(16, 8).to(torch.bfloat16), x.bfloat16()
        assert torch.equal(layer_bf16.forward_gelu(xb), F.gelu(F.linear(xb, layer_bf16.weight, layer_bf16.bias)))
    assert calls == []


def test_onednn_takes_fp32_with_avx512_and_bf16_where_it_computes_it(monkeypatch, request):
    request.addfinalizer(kernels.onednn_matmul.cache_clear)  # later tests ask this machine again
    kernels.onednn_matmul.cache_clear()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not kernels.onednn_matmul(torch.float32)
    kernels.onednn_matmul.cache_clear()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert kernels.onednn_matmul(torch.float32) and not kernels.onednn_matmul(torch.float16)
    assert kernels.onednn_matmul(torch.bfloat16) == torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.parametrize(
    ("cpuinfo", "capability", "want"),
    [
        ("vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n", "AVX512", True),  # a Zen 4
        ("vendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n", "AVX512", False),  # a Zen 5
        ("vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n", "AVX2", False),  # a Zen 3: MKL anyway
        ("vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n", "AVX512", False),
    ],
)
def test_mkl_takes_the_weight_gradients_on_a_zen_4_only(cpuinfo, capability, want, monkeypatch, request, tmp_path):
    for rule in (kernels.onednn_matmul, kernels.mkl_weight_grad):
        request.addfinalizer(rule.cache_clear)  # later tests ask this machine again
        rule.cache_clear()
    (tmp_path / "cpuinfo").write_text(cpuinfo)
    monkeypatch.setattr(kernels, "_CPUINFO", str(tmp_path / "cpuinfo"))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert kernels.mkl_weight_grad() == want


def test_other_dtypes_and_autocast_take_f_linear_exactly():
    torch.manual_seed(0)
    layer, x = Linear(16, 8), torch.randn(4, 16)
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    layer_bf16 = Linear(16, 8).to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    assert torch.equal(layer_bf16(xb), F.linear(xb, layer_bf16.weight, layer_bf16.bias))


def test_whole_model_logits_and_gradients_agree_with_reference(onednn_fp32):
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


def test_whole_model_bf16_inference_as_close_to_fp64_as_the_reference_path():
    torch.manual_seed(0)
    model = vitkit.create_model("vit_ti16", img_size=64, patch_size=8, depth=4, num_classes=10).eval()  # d = 64
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        exact = model.double()(x.double())
        model.bfloat16()
        fast = model(x.bfloat16()).double()
        with reference_kernels():
            ref = model(x.bfloat16()).double()
    assert not torch.equal(fast, ref)  # the fast kernels ran
    fast_err, ref_err = (fast - exact).abs().mean().item(), (ref - exact).abs().mean().item()
    assert fast_err <= 1.1 * ref_err, (fast_err, ref_err)
    assert fast_err < 0.02 * exact.abs().mean().item(), (fast_err, exact.abs().mean().item())


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


def _attention_and_grads(qkv, heads, grad_out):
    qkv = qkv.detach().requires_grad_()
    out, _ = attention(qkv, heads, 0.0, need_weights=False)
    out.backward(grad_out)
    return [t.double() for t in (out.detach(), qkv.grad)], type(out.grad_fn).__name__


@pytest.mark.parametrize("tokens", [17, 197])
def test_bf16_training_attention_as_accurate_as_the_flash_kernel(tokens):
    torch.manual_seed(0)
    qkv, g = torch.randn(2, tokens, 3 * 3 * 32) * 2, torch.randn(2, tokens, 3 * 32)
    exact, _ = _attention_and_grads(qkv.double(), 3, g.double())
    fast, _ = _attention_and_grads(qkv.bfloat16(), 3, g.bfloat16())
    with reference_kernels():
        flash, _ = _attention_and_grads(qkv.bfloat16(), 3, g.bfloat16())
    for name, e, a, b in zip(["out", "grad qkv"], exact, fast, flash, strict=True):
        fast_err, flash_err = (a - e).abs().mean().item(), (b - e).abs().mean().item()
        assert not torch.equal(a, b), f"{name}: the fast path did not run"
        # bf16 rounds to 8 bits: both are ~1% of the typical value; the explicit scores add one rounding.
        assert fast_err < 3 * flash_err + 1e-3, (name, fast_err, flash_err)
        assert fast_err < 0.02 * e.abs().mean().item(), (name, fast_err)


needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler to build the native attention"
)


@needs_compiler
@pytest.mark.parametrize(
    ("tokens", "heads", "head_dim"),
    [(197, 3, 64), (17, 2, 32), (5, 1, 16), (50, 2, 80)],  # ViT's 197 tokens, the hybrid's 17, tiny, ViT-H's d = 80
)
def test_native_fp32_attention_as_accurate_as_the_flash_kernel(tokens, heads, head_dim):
    torch.manual_seed(0)
    qkv, g = torch.randn(2, tokens, 3 * heads * head_dim) * 2, torch.randn(2, tokens, heads * head_dim)
    exact, _ = _attention_and_grads(qkv.double(), heads, g.double())
    fast, fast_fn = _attention_and_grads(qkv, heads, g)
    with reference_kernels():
        flash, flash_fn = _attention_and_grads(qkv, heads, g)
    assert "Native" in fast_fn and "Native" not in flash_fn
    for name, e, a, b in zip(["out", "grad qkv"], exact, fast, flash, strict=True):
        fast_err, flash_err = (a - e).abs().max().item(), (b - e).abs().max().item()
        assert e.abs().max() > 1.0, name
        # Both are fp32 sums over the tokens: a few 1e-6 of the largest value; a wrong mask, scale or exponential
        # would be off by far more.
        assert fast_err < 3 * flash_err + 1e-6, (name, fast_err, flash_err)
        assert fast_err < 1e-5 * e.abs().max().item() * tokens**0.5, (name, fast_err)


@needs_compiler
def test_native_attention_same_bits_any_thread_count_and_without_autograd():
    torch.manual_seed(0)
    qkv = torch.randn(3, 33, 2 * 3 * 64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = attention(qkv, 2, 0.0, need_weights=False)
        torch.set_num_threads(3)  # more threads than heads for some of them, uneven shares
        three, _ = attention(qkv.requires_grad_(), 2, 0.0, need_weights=False)
    finally:
        torch.set_num_threads(threads)
    with torch.inference_mode():
        inference, _ = attention(qkv, 2, 0.0, need_weights=False)
    assert "Native" in type(three.grad_fn).__name__
    assert torch.equal(one, three) and torch.equal(one, inference)


@needs_compiler
@pytest.mark.parametrize(("tokens", "heads", "head_dim"), [(197, 3, 64), (17, 2, 32), (50, 2, 80)])
def test_native_bf16_inference_attention_rounds_once(tokens, heads, head_dim, monkeypatch):
    calls, original = [], kernels._native_bf16_inference
    monkeypatch.setattr(kernels, "_native_bf16_inference", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    qkv = (torch.randn(2, tokens, 3 * heads * head_dim) * 2).bfloat16()
    with torch.inference_mode():
        fast, _ = attention(qkv, heads, 0.0, need_weights=False)
        with reference_kernels():
            flash, _ = attention(qkv, heads, 0.0, need_weights=False)
    assert calls == [1]
    exact, _ = attention(qkv.double(), heads, 0.0, need_weights=False)
    fast_err, flash_err = (fast.double() - exact).abs(), (flash.double() - exact).abs()
    # Computed in fp32 and rounded once: within half a bf16 unit (at most 2^-8 of the value) plus fp32 noise; the
    # flash kernel rounds the probabilities to bf16 too, so it is never closer on average.
    assert (fast_err <= exact.abs() * 2**-8 + 1e-4).all(), fast_err.max()
    assert fast_err.mean() <= flash_err.mean()


def test_head_sizes_the_native_kernel_does_not_take_use_the_flash_kernel():
    torch.manual_seed(0)
    qkv = torch.randn(2, 9, 3 * 4 * 8).requires_grad_()  # head_dim 8: not a multiple of the kernel's 16
    out, _ = attention(qkv, 4, 0.0, need_weights=False)
    assert "Native" not in type(out.grad_fn).__name__
    q, k, v = qkv.view(2, 9, 3, 4, 8).permute(2, 0, 3, 1, 4)
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 9, 32)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_native_attention_unavailable_warns_and_falls_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path))
    for compiler, expected in [(str(tmp_path / "no-such-compiler"), "unavailable"), ("false", "could not compile")]:
        monkeypatch.setenv("CXX", compiler)
        native.library.cache_clear()
        try:
            with caplog.at_level(logging.WARNING, logger="vitkit"):
                assert native.library() is None
            assert expected in caplog.text and "PyTorch's attention runs instead" in caplog.text
            qkv = torch.randn(1, 5, 3 * 16)
            out, _ = attention(qkv, 1, 0.0, need_weights=False)
            q, k, v = qkv.view(1, 5, 3, 1, 16).permute(2, 0, 3, 1, 4)
            torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 5, 16))
        finally:
            native.library.cache_clear()
    assert list(tmp_path.iterdir()) == []  # no half-written library left behind


def test_attention_weights_are_the_softmax_that_weighs_v():
    torch.manual_seed(0)
    qkv = torch.randn(2, 9, 3 * 4 * 8)
    out, attn = attention(qkv, 4, 0.0, need_weights=True)
    q, k, v = qkv.view(2, 9, 3, 4, 8).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 9))
    torch.testing.assert_close(attn, torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, -1))
    ref = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 9, 32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_training_step_agrees_with_reference_kernels():
    torch.manual_seed(0)
    model = vitkit.create_model("vit_ti16", img_size=32, patch_size=8, width=64, depth=2, heads=2, num_classes=10)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)

    def step():
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    fast_loss, fast_grad = step()
    with reference_kernels():
        ref_loss, ref_grad = step()
    assert not torch.equal(fast_grad, ref_grad)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-2, atol=0)
    # Gradients as a whole (single entries near zero differ relatively more in bf16).
    assert (fast_grad - ref_grad).norm() < 0.03 * ref_grad.norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [17, 12])  # the stem's SAME-padded odd size, and an even one
def test_channels_last_max_pool_equals_the_nchw_kernel(dtype, size):
    torch.manual_seed(0)
    # Values on a coarse grid, after a ReLU as in the stem: many windows hold ties, at zero and above.
    x = F.relu(torch.randint(-2, 4, (3, 5, size, size)).to(dtype))
    g = torch.randn(3, 5, (size - 3) // 2 + 1, (size - 3) // 2 + 1).to(dtype)

    def pool_and_grad():
        leaf = x.clone().requires_grad_()
        inner = leaf * 1  # what the stem's GroupNorm backward receives is the gradient of a non-leaf
        grads = []
        inner.register_hook(grads.append)
        out = max_pool(inner, 3, 2)
        out.backward(g)
        return out.detach(), grads[0], type(out.grad_fn).__name__

    out, grad, fast_fn = pool_and_grad()
    assert "ChannelsLast" in fast_fn
    with reference_kernels():
        ref_out, ref_grad, _ = pool_and_grad()
    assert ref_grad.abs().sum() > 0
    assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)
    assert out.is_contiguous() and grad.is_contiguous()  # NCHW in and out, the GroupNorms' fast layout
