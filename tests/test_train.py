import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from vitkit import load_pretrained
from vitkit.cli import main
from vitkit.data import open_source
from vitkit.train import load_config, train
from vitkit.train.metrics import read_metrics

TINY = {
    "model.img_size": 8,
    "model.overrides": {"patch_size": 2, "in_chans": 1, "width": 32, "depth": 2, "heads": 2, "mlp_dim": 64},
    "data.workers": 0,
    "train.batch_size": 32,
    "train.log_every": 1,
    "augment.hflip": 0.0,
    "augment.crop_scale": [0.7, 1.0],
}


def tiny(**overrides):
    return load_config(None, {**TINY, **overrides})


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_pretrained(run_dir / "model").state_dict()


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def test_training_on_the_embedded_digits_learns(tmp_path):
    cfg = tiny(**{"train.steps": 300, "optim.lr": 3e-3, "schedule.warmup_steps": 10, "train.eval_every": 0})
    out = train(cfg, tmp_path / "run", progress="none")
    assert out["step"] == 300 and out["top1"] > 0.5  # chance is 0.1
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "checkpoints/last.pt", "eval/metrics.json"):
        assert (run / name).is_file(), name
    model = load_pretrained(run / "model")
    assert model.classes == [str(i) for i in range(10)] and model.cfg.in_chans == 1
    train_losses = [loss for _, loss in losses(run)]
    assert sum(train_losses[-10:]) / 10 < 0.6 * sum(train_losses[:10]) / 10
    assert json.loads((run / "eval" / "metrics.json").read_text())["top1"] == pytest.approx(out["top1"])


def test_eval_flip_scores_the_run_with_mirror_images(tmp_path):
    from vitkit.evaluate import evaluate

    out = train(tiny(**{"train.steps": 20, "train.eval_every": 0, "train.eval_flip": True}), tmp_path, progress="none")
    model, val = load_pretrained(tmp_path / "model"), open_source(None, "val")
    flipped, plain = evaluate(model, val, flip=True), evaluate(model, val)
    assert out["loss"] == pytest.approx(flipped.loss, abs=1e-6) and out["top1"] == flipped.top1
    assert out["loss"] != pytest.approx(plain.loss, abs=1e-4)


def test_same_seed_same_losses_bit_for_bit(tmp_path):
    run = {"train.steps": 6, "train.eval_every": 0, "augment.randaugment_ops": 2, "augment.mixup": 0.2}
    cfg = tiny(**run)
    train(cfg, tmp_path / "a", progress="none")
    train(cfg, tmp_path / "b", progress="none")
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    train(tiny(**run, **{"data.cache": "1MiB"}), tmp_path / "cached", progress="none")
    assert losses(tmp_path / "cached") == losses(tmp_path / "a")  # decoded images kept in memory: the same batches
    train(tiny(**{"train.steps": 6, "train.eval_every": 0, "train.seed": 1}), tmp_path / "c", progress="none")
    assert losses(tmp_path / "c") != losses(tmp_path / "a")


def test_compiled_training_matches_eager(tmp_path):
    # SGD: Adam would turn rounding-level gradient differences (the key bias, whose gradient is 0) into lr steps.
    cfg = {"train.steps": 4, "train.eval_every": 0, "augment.randaugment_ops": 1, "optim.name": "sgd"}
    train(tiny(**cfg), tmp_path / "eager", progress="none")
    out = train(tiny(**cfg, **{"train.compile": True}), tmp_path / "compiled", progress="none")
    assert out["step"] == 4
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert [s for s, _ in compiled] == [1, 2, 3, 4]
    assert [v for _, v in compiled] == pytest.approx([v for _, v in eager], rel=1e-4)
    wa, wb = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert wa.keys() == wb.keys()  # the saved model is the plain one, not the compiled wrapper
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)


def interrupt_after(run: Path, step: int) -> None:
    """Send this process SIGTERM (as a cluster scheduler would) once the run has logged `step`."""

    def watch():
        while True:
            try:
                if any(r["step"] >= step for r in read_metrics(run / "metrics.jsonl")):
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()


def test_interrupted_run_resumes_mid_epoch_exactly(tmp_path):
    # 1,617 images at batch 16: the interruption lands mid-epoch, so the sampler position matters.
    cfg = tiny(**{"train.steps": 14, "train.eval_every": 0, "augment.randaugment_ops": 1, "optim.name": "sgd",
                  "train.ema_decay": 0.9, "train.batch_size": 16, "train.accum_steps": 2,
                  "model.overrides.drop_path": 0.1})  # fmt: skip
    train(cfg, tmp_path / "full", progress="none")
    part = tmp_path / "part"
    interrupt_after(part, 5)
    out = train(cfg, part, progress="none")
    assert out["interrupted"] and 5 <= out["step"] < 14
    assert not (part / "model").exists()
    assert train(cfg, part, resume=True, progress="none")["step"] == 14
    assert losses(part) == losses(tmp_path / "full")
    wa, wb = weights(tmp_path / "full"), weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_existing_run_directory_is_refused_unless_resumed_or_overwritten(tmp_path):
    cfg = tiny(**{"train.steps": 2, "train.eval_every": 0})
    run = tmp_path / "run"
    train(cfg, run, progress="none")
    with pytest.raises(FileExistsError, match="resume it"):
        train(cfg, run, progress="none")
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a vitkit run directory"):
        train(cfg, other, overwrite=True, progress="none")
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="config differs"):
        train(tiny(**{"train.steps": 3, "train.eval_every": 0}), run, resume=True, progress="none")
    assert train(cfg, run, overwrite=True, progress="none")["step"] == 2


@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_is_resolved_and_recorded_where_the_run_starts(native, tmp_path, monkeypatch):
    import yaml

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cfg = tiny(**{"train.steps": 3, "train.eval_every": 0, "train.save_every": 2, "train.precision": "auto"})
    run = tmp_path / "run"
    interrupt_after(run, 2)
    assert train(cfg, run, progress="none")["interrupted"]
    want = "bf16" if native else "fp32"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["precision"] == want
    assert cfg.train.precision == "auto"  # the caller's config is left as it was
    # The same auto config resumes (it resolves to what the run recorded); a run recorded in the other precision
    # is refused as a different config.
    assert train(cfg, run, resume=True, progress="none")["step"] == 3
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: not native)
    with pytest.raises(ValueError, match="config differs"):
        train(cfg, run, resume=True, progress="none")


def test_cli_train_interrupt_resume_eval_predict(tmp_path, capsys):
    run = tmp_path / "run"
    sets = [f"--set={k}={json.dumps(v)}" for k, v in {**TINY, "train.steps": 400, "train.eval_every": 0}.items()]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vitkit", "train", "--out", str(run), "--progress", "json", *sets]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:  # wait until it is really training, then interrupt it as a scheduler would
        if json.loads(line)["step"] >= 5:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    stopped = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 5 <= stopped < 400 and "--resume" in err
    assert max(s for s, _ in losses(run)) == stopped
    assert main(["train", "--resume", "--out", str(run), "--progress", "none"]) == 0
    steps = [s for s, _ in losses(run)]
    assert steps == list(range(1, 401))  # nothing lost, nothing repeated
    assert main(["eval", str(run / "model"), "digits", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    val = open_source(None, "val")
    assert metrics["top1"] > 0.5 and metrics["count"] == len(val) == 179
    img = tmp_path / "digit.png"
    val.load(0, channels=1).save(img)
    assert main(["predict", str(run / "model"), str(img), "--format", "json"]) == 0
    pred = json.loads(capsys.readouterr().out)[0]
    assert pred["labels"][0] in [str(i) for i in range(10)] and 0 < pred["probs"][0] <= 1


def test_progress_off_a_terminal_is_a_plain_line_per_record(tmp_path, capsys):
    sets = [f"--set={k}={json.dumps(v)}" for k, v in {**TINY, "train.steps": 4}.items()]
    assert main(["train", "--out", str(tmp_path / "run"), *sets]) == 0  # stderr is captured here: not a terminal
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err and "step/s" not in err  # no bar redrawn into the log
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    lines = [line for line in err.splitlines() if line.startswith(("step ", "eval @"))]
    assert len(lines) == len(records) and [r["kind"] for r in records] == ["train"] * 4 + ["eval"]
    for line, r in zip(lines, records, strict=True):
        if r["kind"] == "train":
            assert line.startswith(f"step {r['step']}/4 (epoch {r['epoch']:.2f}): loss {r['loss']:.4f}, ")
            assert f"{r['images_per_s']:.0f} images/s, ETA 0:00:0" in line
        else:
            assert line == (
                f"eval @ step {r['step']} (epoch {r['epoch']:.2f}): top-1 {r['top1']:.2%}, "
                f"top-5 {r['top5']:.2%}, loss {r['loss']:.4f}"
            )


def test_reinit_blocks_gives_the_last_blocks_of_the_init_checkpoint_fresh_weights(tmp_path):
    from vitkit import create_model, save_pretrained
    from vitkit.train.loop import build_model

    kw = {"img_size": 16, "patch_size": 4, "width": 32, "depth": 3, "heads": 2, "mlp_dim": 64, "num_classes": 5}
    pretrained = create_model("vit_ti16", **kw)
    with torch.no_grad():
        for p in pretrained.parameters():
            p.add_(1.0)  # weights that no initialisation draws: norm weights near 2, biases near 1
    save_pretrained(pretrained, tmp_path / "pre")
    classes = [str(i) for i in range(5)]
    settings = {"model.init": str(tmp_path / "pre"), "model.img_size": 16}
    model = build_model(load_config(None, {**settings, "model.reinit_blocks": 1}), classes)
    before = pretrained.state_dict()
    for name, value in model.state_dict().items():
        if not name.startswith(("blocks.2.", "norm.")):
            assert torch.equal(value, before[name]), name
    last = model.blocks[2]
    for norm in (last.norm1, last.norm2, model.norm):
        assert torch.equal(norm.weight, torch.ones(32)) and torch.equal(norm.bias, torch.zeros(32))
    assert torch.equal(last.attn.qkv.bias, torch.zeros(96)) and last.mlp.fc1.bias.abs().max() < 1e-5
    bound = math.sqrt(6 / (32 + 64))  # xavier-uniform for fc1 (64 x 32)
    w = last.mlp.fc1.weight
    assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert not torch.equal(model.blocks[2].attn.proj.weight, before["blocks.2.attn.proj.weight"])
    with pytest.raises(ValueError, match=r"model.reinit_blocks=4 for .*pre: .*0 to 3"):
        build_model(load_config(None, {**settings, "model.reinit_blocks": 4}), classes)
    with pytest.raises(ValueError, match=r"model.reinit_blocks=-1; expected >= 0"):
        load_config(None, {"model.reinit_blocks": -1})
    # From scratch the blocks are fresh already: the same model as without the setting.
    torch.manual_seed(0)
    plain = build_model(tiny(), classes).state_dict()
    torch.manual_seed(0)
    same = build_model(tiny(**{"model.reinit_blocks": 1}), classes).state_dict()
    assert all(torch.equal(plain[n], same[n]) for n in plain)
