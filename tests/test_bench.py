import copy
import json
import statistics

import pytest
import torch

import vitkit
from vitkit import bench
from vitkit.bench.memory import _peak_rss, fit_line, max_batch, peak_memory
from vitkit.bench.peak import Peak, matmul_peak
from vitkit.bench.peers import build_peer
from vitkit.bench.throughput import flops_per_image, make_step, measure
from vitkit.cli import main
from vitkit.models.kernels import onednn_matmul
from vitkit.sizes import format_size, parse_size

# 32 px, patch 8: 16 patches + the class token = 17 tokens of width 32; 2 blocks, 4 heads, MLP 64, 3 classes.
TINY = dict(img_size=32, patch_size=8, width=32, depth=2, heads=4, mlp_dim=64, num_classes=3)
TINY_SET = [item for k, v in TINY.items() for item in ("--set", f"{k}={v}")]


def tiny_cfg() -> vitkit.ViTConfig:
    return vitkit.models.resolve_config("vit_ti16", **TINY)


def test_peak_measures_every_kernel_and_takes_the_best():
    for dtype in ("fp32", "bf16"):
        peak = matmul_peak(dtype, n=128, repeats=2)
        assert "torch.matmul" in peak.kernels
        if torch.backends.mkldnn.is_available():  # oneDNN computes bf16 only with AVX-512
            assert ("onednn.linear" in peak.kernels) == (dtype == "fp32" or onednn_matmul(torch.bfloat16))
        assert all(g > 0 for g in peak.kernels.values())
        assert peak.gflops == max(peak.kernels.values()) and peak.kernels[peak.kernel] == peak.gflops
    int8 = matmul_peak("int8", n=128, repeats=2)
    assert list(int8.kernels) == ["int8.linear"] and int8.gflops > 0
    with pytest.raises(ValueError, match="int8 runs on CPU"):
        matmul_peak("int8", "cuda")
    peak = Peak("fp32", "cpu", {"torch.matmul": 193.0, "onednn.linear": 445.0})
    assert peak.gflops == 445.0 and peak.kernel == "onednn.linear"
    with pytest.raises(ValueError, match="fp16"):
        matmul_peak("fp16")


def test_flops_match_a_hand_count():
    # MACs per image: patch embedding 16 x 192 x 32 = 98,304; per block qkv 17x32x96 = 52,224, scores and
    # attention-weighted values 2 x 17x17x32 = 18,496, projection 17x32x32 = 17,408, MLP 2 x 17x32x64 = 69,632
    # (157,760 per block, 315,520 for 2); head 32x3 = 96. Total 413,920; 2 FLOPs per MAC; training x3.
    # As vitkit runs it, the last block's 16 patch tokens skip their scores and weighted values (2 x 16x17x32 =
    # 17,408), projection (16x32x32 = 16,384) and MLP (2 x 16x32x64 = 65,536): 99,328 fewer, 314,592.
    cfg = tiny_cfg()
    assert vitkit.count_macs(cfg) == 413_920
    assert vitkit.count_macs(cfg, as_run=True) == 314_592
    assert flops_per_image(cfg, "infer") == 827_840
    assert flops_per_image(cfg, "train") == 2_483_520
    assert flops_per_image(cfg, "train", as_run=True) == 1_887_552
    assert vitkit.count_macs(cfg.replace(pool="gap"), as_run=True) == vitkit.count_macs(cfg.replace(pool="gap"))
    results = measure({"vitkit": vitkit.create_model(cfg)}, cfg, 2, task="infer", rounds=2)
    r = results[0]
    assert r.images_per_s == pytest.approx(2 / statistics.median(r.seconds))
    assert r.gflops == pytest.approx(r.images_per_s * 2 * 314_592 / 1e9)


def test_hf_peer_is_the_same_model(tmp_path):
    pytest.importorskip("transformers")
    from transformers import ViTForImageClassification

    cfg = tiny_cfg().replace(gelu="tanh", norm_eps=1e-12)
    torch.manual_seed(0)
    ours = vitkit.create_model(cfg).eval()
    peer = build_peer("hf", cfg).eval()
    # 6,176 patch embedding + 32 class token + 544 position + 2 x 8,544 blocks + 64 norm + 99 head.
    assert vitkit.count_params(ours) == vitkit.count_params(peer) == 24_003
    # The same weights in both (through vitkit's Hugging Face writer) give the same logits.
    vitkit.save_pretrained(ours, tmp_path / "hf", to="hf")
    peer.model.load_state_dict(ViTForImageClassification.from_pretrained(tmp_path / "hf").state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(peer(x), ours(x), atol=1e-5, rtol=1e-5)


def test_peers_refuse_what_they_cannot_build():
    with pytest.raises(ValueError, match=r"ViTConfig\.hybrid"):
        build_peer("hf", vitkit.models.resolve_config("r50_vit_b16"))
    with pytest.raises(ValueError, match=r"ViTConfig\.pool='gap'"):
        build_peer("hf", tiny_cfg().replace(pool="gap"))
    with pytest.raises(ValueError, match="unknown peer 'jax'"):
        build_peer("jax", tiny_cfg())
    for peer, library in (("timm", "timm"), ("torchvision", "torchvision")):
        try:
            __import__(library)
        except Exception:
            with pytest.raises(ImportError, match=f"--vs {peer}: {library} does not import here"):
                build_peer(peer, tiny_cfg())
        else:
            assert vitkit.count_params(build_peer(peer, tiny_cfg())) == 24_003


def test_throughput_of_train_and_infer_and_the_ratio():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    ours = vitkit.create_model(cfg)
    twin = copy.deepcopy(ours)
    before = ours.head.weight.detach().clone()
    results = measure({"vitkit": ours, "twin": twin}, cfg, 2, task="train", rounds=3)
    assert [r.name for r in results] == ["vitkit", "twin"]
    assert all(r.images_per_s > 0 and len(r.seconds) == 3 for r in results)
    assert results[0].ratio == 1.0
    paired = sorted(twin_s / ours_s for ours_s, twin_s in zip(results[0].seconds, results[1].seconds, strict=True))
    assert results[1].ratio == pytest.approx(paired[1])  # the median of the 3 rounds' ratios
    assert results[0].gflops == pytest.approx(results[0].images_per_s * 1_887_552 / 1e9)  # as run
    assert not torch.equal(ours.head.weight, before)  # the AdamW step ran
    torch.testing.assert_close(ours.head.weight, twin.head.weight)  # the same steps on the same batch

    infer = measure({"vitkit": ours}, cfg, 2, task="infer", dtype="bf16", rounds=2)
    assert infer[0].images_per_s > 0 and infer[0].compile_s is None
    assert ours.head.weight.dtype == torch.bfloat16  # bf16 inference casts the weights


def test_int8_inference_runs_an_int8_copy_for_vitkit_and_the_peer():
    pytest.importorskip("transformers")
    cfg = tiny_cfg()
    ours = vitkit.create_model(cfg)
    results = measure({"vitkit": ours, "hf": build_peer("hf", cfg)}, cfg, 2, task="infer", dtype="int8", rounds=2)
    assert [r.name for r in results] == ["vitkit", "hf"] and all(r.images_per_s > 0 for r in results)
    assert ours.head.weight.dtype == torch.float32 and ours.blocks[0].mlp.fc1.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="int8 is for inference on CPU, not train"):
        make_step(ours, cfg, 2, task="train", dtype="int8")


def test_make_step_refuses_unknown_settings():
    with pytest.raises(ValueError, match="task 'predict'"):
        make_step(vitkit.create_model(tiny_cfg()), tiny_cfg(), 2, task="predict")
    with pytest.raises(ValueError, match="mode 'jit'"):
        make_step(vitkit.create_model(tiny_cfg()), tiny_cfg(), 2, mode="jit")


def test_sizes():
    assert parse_size("16GiB") == 16 * 2**30
    assert parse_size("500MB") == 500_000_000
    assert parse_size("1.5 GiB") == 3 * 2**29
    assert parse_size("1073741824") == 2**30
    assert format_size(3 * 2**29) == "1.50 GiB" and format_size(2**20) == "1.0 MiB"
    with pytest.raises(ValueError, match="'16 gigs'"):
        parse_size("16 gigs")


def test_max_batch_from_a_line():
    def linear(batch):  # 100 MB fixed, 10 MB per image
        return 100_000_000 + 10_000_000 * batch

    assert fit_line([(2, linear(2)), (4, linear(4))]) == pytest.approx((1e8, 1e7))
    fit = max_batch(tiny_cfg(), 1_000_000_000, measure=linear)
    assert fit.max_batch == 90 and fit.points == [(8, linear(8)), (16, linear(16))] and fit.verified is None
    assert fit.fixed == pytest.approx(1e8) and fit.per_image == pytest.approx(1e7)
    assert max_batch(tiny_cfg(), 1_000_000_000, measure=linear, verify=True).verified == linear(90)

    def jump(batch):  # something else allocates 500 MB more from batch 80 on: the line over-predicts
        return linear(batch) + (500_000_000 if batch >= 80 else 0)

    fit = max_batch(tiny_cfg(), 1_000_000_000, measure=jump, verify=True)
    assert fit.max_batch == 58 and fit.verified == jump(58) <= 1_000_000_000  # 58: the secant from 8 to 90
    assert fit.points[2] == (90, jump(90))  # the prediction was measured, did not fit, and was shrunk
    with pytest.raises(ValueError, match="does not fit one image"):
        max_batch(tiny_cfg(), 50_000_000, measure=linear)
    with pytest.raises(ValueError, match="did not grow with the batch"):
        max_batch(tiny_cfg(), 50_000_000, measure=lambda b: 100)


def test_peak_memory_of_a_fresh_process():
    # The whole process's peak RSS: the interpreter and PyTorch are a few hundred MB before any model.
    ballast = torch.ones(2**27)  # 512 MiB here, which must not count there (ru_maxrss would carry it over)
    used = peak_memory(tiny_cfg(), 2, task="train", threads=1)
    assert 100 * 2**20 < used < _peak_rss() - 256 * 2**20
    del ballast


def test_cli_bench(capsys, monkeypatch):
    # A fixed peak, so that the % of peak printed can be checked exactly.
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype, device: Peak(dtype, str(device), {"torch.matmul": 100.0}))
    args = ["bench", "vit_ti16", *TINY_SET, "--batch", "2", "--rounds", "2", "--device", "cpu", "--no-memory"]
    assert main([*args, "--json", "--task", "train"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["config"]["width"] == 32 and record["task"] == "train" and record["peak"]["gflops"] == 100.0
    (r,) = record["results"]
    assert r["name"] == "vitkit" and r["ratio"] == 1.0 and r["memory_bytes"] is None
    assert r["gflops"] == pytest.approx(r["images_per_s"] * 1_887_552 / 1e9)  # as vitkit runs it
    assert r["percent_of_peak"] == pytest.approx(r["gflops"])  # against the 100 GFLOP/s peak

    assert main([*args, "--vs", "hf"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "fp32 matmul peak 100 GFLOP/s (torch.matmul)"
    assert out[2].split() == ["model", "img/s", "GFLOP/s", "%", "of", "peak", "peak", "memory", "vitkit", "x"]
    ours, hf = out[3].split(), out[4].split()
    assert ours[0] == "vitkit" and ours[-1] == "1.00" and hf[0] == "hf" and hf[-2] == "-"
    assert float(hf[-1]) > 0 and len(hf[-1].split(".")[1]) == 2
    # The ratio is the median of the rounds' paired ratios (not the ratio of the median rates, which a slow
    # spell of the machine in one round can move): exactly what the rounds' own times give.
    assert main([*args, "--vs", "hf", "--json"]) == 0
    ours, hf = json.loads(capsys.readouterr().out)["results"]
    paired = [theirs / mine for mine, theirs in zip(ours["seconds"], hf["seconds"], strict=True)]
    assert hf["name"] == "hf" and hf["ratio"] == pytest.approx(statistics.median(paired), rel=1e-12)
    # Each side's own work: HF computes every token of the last block, vitkit the class token's alone there.
    assert hf["gflops"] == pytest.approx(hf["images_per_s"] * 827_840 / 1e9)
    assert ours["gflops"] == pytest.approx(ours["images_per_s"] * 629_184 / 1e9)

    assert main([*args, "--memory", "1GiB"]) == 2
    assert "--memory is the budget of --max-batch" in capsys.readouterr().err
    assert main([*args, "--grad-checkpointing"]) == 2
    assert "add --task train" in capsys.readouterr().err


def test_cli_max_batch(capsys, monkeypatch):
    seen = []

    def fake(cfg, batch, **kind):
        seen.append((cfg.width, batch, kind["task"], kind["grad_checkpointing"]))
        return 2**30 + 2**28 * batch  # 1 GiB + 256 MiB per image

    monkeypatch.setattr(bench.memory, "peak_memory", fake)
    args = ["bench", "vit_ti16", *TINY_SET, "--device", "cpu", "--max-batch", "--memory", "16GiB", "--task", "train"]
    assert main([*args, "--grad-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "fit: memory = 1.00 GiB + 256.0 MiB x batch" in out
    assert "largest batch in 16.00 GiB: 60 (predicted 16.00 GiB)" in out
    assert seen == [(32, 8, "train", True), (32, 16, "train", True)]
    assert main(["bench", "vit_ti16", "--max-batch"]) == 2
    assert "--max-batch needs --memory SIZE" in capsys.readouterr().err
