"""The GPU paths against the CPU reference. Skipped where PyTorch sees no CUDA GPU (as in CI); run on a GPU
machine with `pytest tests/test_cuda.py`."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_train import TINY

from vitkit.bench import compare, measure, peak_memory
from vitkit.models import ViTConfig, create_model
from vitkit.train import load_config, train
from vitkit.train.config import OptimConfig
from vitkit.train.metrics import read_metrics
from vitkit.train.optim import build_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch sees no CUDA GPU here")

SMALL = ViTConfig(img_size=32, patch_size=4, width=64, depth=2, heads=4, mlp_dim=128, num_classes=10)
HYBRID = ViTConfig(
    img_size=32, patch_size=1, width=64, depth=2, heads=4, mlp_dim=128, num_classes=10, hybrid=(1, 1), stem_width=32
)


def images(n: int, cfg: ViTConfig, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, cfg.in_chans, *cfg.img_size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", [SMALL, HYBRID], ids=["plain", "hybrid"])
def test_fp32_forward_on_the_gpu_matches_the_cpu(cfg):
    torch.manual_seed(0)
    model = create_model(cfg).eval()
    x = images(8, cfg)
    with torch.no_grad():
        cpu = model(x)
        gpu = copy.deepcopy(model).cuda()(x.cuda()).cpu()
    # cuDNN may run the hybrid stem's convolutions in TF32 (PyTorch's default for convolutions): 10-bit mantissas.
    tol = 2e-2 if cfg.hybrid else 1e-4
    assert (gpu - cpu).abs().max().item() < tol * cpu.abs().max().item()


def test_bf16_inference_agrees_with_fp32_on_the_gpu():
    torch.manual_seed(0)
    model = create_model(SMALL).eval().cuda()
    x = images(64, SMALL).cuda()
    with torch.no_grad():
        ref = model(x)
        fast = copy.deepcopy(model).to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    assert (fast - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    assert (fast.argmax(1) == ref.argmax(1)).float().mean().item() >= 0.9
    assert not torch.equal(fast, ref)  # it really ran in bf16


def test_training_gradients_on_the_gpu_match_the_cpu():
    torch.manual_seed(0)
    model = create_model(SMALL)
    gpu_model = copy.deepcopy(model).cuda()
    x, y = images(16, SMALL), torch.arange(16) % 10
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(gpu_model(x.cuda()), y.cuda()).backward()
    largest = max(p.grad.abs().max().item() for p in model.parameters())
    for (name, p), q in zip(model.named_parameters(), gpu_model.parameters(), strict=True):
        assert (q.grad.cpu() - p.grad).abs().max().item() < 1e-4 * largest, name


def test_fused_adamw_on_the_gpu_matches_the_cpu_update():
    torch.manual_seed(0)
    model = create_model(SMALL)
    gpu_model = copy.deepcopy(model).cuda()
    cfg = OptimConfig(lr=1e-3, weight_decay=0.05)
    opt, gpu_opt = build_optimizer(model, cfg), build_optimizer(gpu_model, cfg)
    assert all(g.get("fused") for g in gpu_opt.param_groups)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):  # the same gradients on both devices: the update alone is compared
        for p, q in zip(model.parameters(), gpu_model.parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.cuda()
        opt.step()
        gpu_opt.step()
    for (name, p), q in zip(model.named_parameters(), gpu_model.parameters(), strict=True):
        assert (q.detach().cpu() - p.detach()).abs().max().item() < 1e-6, name


GPU_RUN = {**TINY, "train.eval_every": 0, "train.device": "cuda"}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_on_the_gpu_learns(tmp_path, precision):
    cfg = load_config(None, {**GPU_RUN, "train.steps": 300, "optim.lr": 3e-3, "train.precision": precision})
    out = train(cfg, tmp_path / "run", progress="none")
    assert out["step"] == 300 and out["top1"] > 0.5  # the embedded digits; chance is 0.1
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 300
    assert (state["scaler"].get("scale", 0) > 0) == (precision == "fp16")  # the loss scaler is saved with the run


def test_bench_on_the_gpu_reports_memory_and_the_ratio():
    model = create_model(SMALL)
    weights = sum(p.numel() * 4 for p in model.parameters())
    results = compare(model, [], batch=16, task="train", device="cuda", rounds=2)
    (r,) = results
    assert r.images_per_s > 0 and r.ratio == 1.0
    assert r.memory_bytes >= 4 * weights  # weights, gradients and AdamW's two moments at least
    peak = peak_memory(SMALL, 16, task="train", device="cuda")
    assert 4 * weights <= peak < 64 * 2**20
    infer = measure({"a": create_model(SMALL), "b": create_model(SMALL)}, SMALL, 16, device="cuda", rounds=2)
    assert [x.name for x in infer] == ["a", "b"] and 0.2 < infer[1].ratio < 5
