"""DistributedDataParallel on CPU (gloo): two ranks equal one process with the same global batch."""

import os
import socket

import torch
import torch.multiprocessing as mp

from vitkit import load_pretrained
from vitkit.train import RunConfig, load_config, train
from vitkit.train.loop import build_model

SETTINGS = {
    "model.img_size": 8,
    "model.overrides": {"patch_size": 2, "in_chans": 1, "width": 32, "depth": 2, "heads": 2, "mlp_dim": 64},
    "data.workers": 0,
    "train.batch_size": 32,  # the global batch: 16 per rank with 2 ranks
    "train.steps": 6,
    "train.eval_every": 0,
    "augment.hflip": 0.0,  # device augmentation draws per rank; the loader's crops are per sample and agree
    "optim.clip_grad": 1.0,
    # SGD: Adam divides by the root of tiny second moments and so magnifies float rounding into visible steps.
    "optim.name": "sgd",
    "optim.lr": 0.1,
}


def _rank(rank: int, world: int, port: int, cfg: dict, run_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    train(RunConfig.from_dict(cfg), run_dir, progress="none")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process(tmp_path):
    cfg = load_config(None, SETTINGS)
    train(cfg, tmp_path / "one", progress="none")
    mp.spawn(_rank, args=(2, free_port(), cfg.to_dict(), str(tmp_path / "two")), nprocs=2)
    one = load_pretrained(tmp_path / "one" / "model").state_dict()
    two = load_pretrained(tmp_path / "two" / "model").state_dict()
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    assert diff < 1e-5, diff
    # The runs really trained: the weights moved away from the shared initialisation.
    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg, [str(i) for i in range(10)]).state_dict()
    assert max((one[k] - init[k]).abs().max().item() for k in one) > 1e-2
