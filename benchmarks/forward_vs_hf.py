"""Forward-pass throughput of vitkit's ViT against Hugging Face's ViT built with the same config, measured
alternately in the same process (fp32, eval, no grad). Also reports achieved FLOP/s against this machine's
measured fp32 matrix-multiply peak.

    .venv/bin/python benchmarks/forward_vs_hf.py --models vit_s16 vit_b16 --batch 32 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import vitkit


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def hf_twin(cfg: vitkit.ViTConfig) -> torch.nn.Module:
    from transformers import ViTConfig as HFConfig
    from transformers import ViTForImageClassification

    hf_cfg = HFConfig(
        hidden_size=cfg.width,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp_dim,
        image_size=cfg.img_size[0],
        patch_size=cfg.patch_size,
        num_labels=cfg.num_classes,
        layer_norm_eps=cfg.norm_eps,
        attn_implementation="sdpa",
    )
    return ViTForImageClassification(hf_cfg).eval()


def images_per_second(model: torch.nn.Module, x: torch.Tensor) -> float:
    t = time.perf_counter()
    model(x)
    return x.shape[0] / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_s16", "vit_b16"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = matmul_peak_gflops()
    print(f"torch {torch.__version__}, {args.threads} threads, fp32 matmul peak {peak:.0f} GFLOP/s")
    print(f"{'model':<9} {'vitkit img/s':>12} {'HF img/s':>9} {'ratio':>6} {'vitkit % of peak':>17}")
    for name in args.models:
        cfg = vitkit.models.resolve_config(name)
        ours, theirs = vitkit.create_model(cfg).eval(), hf_twin(cfg)
        x = torch.randn(args.batch, 3, *cfg.img_size)
        flops = 2 * vitkit.count_macs(cfg)
        ours_s, theirs_s = [], []
        with torch.inference_mode():
            ours(x), theirs(x)  # warm-up
            for _ in range(args.rounds):  # alternate so drifts in machine load hit both alike
                ours_s.append(images_per_second(ours, x))
                theirs_s.append(images_per_second(theirs, x))
        a, b = statistics.median(ours_s), statistics.median(theirs_s)
        print(f"{name:<9} {a:>12.2f} {b:>9.2f} {a / b:>6.2f} {100 * a * flops / 1e9 / peak:>16.0f}%")


if __name__ == "__main__":
    main()
