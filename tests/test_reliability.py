"""Reliability: bad images, bad checkpoints, bad configuration, non-finite losses and existing outputs never cost
a user their data or their run. (Kills and resumes: test_kill_resume.py; fuzzing of every reader: test_fuzz.py.)"""

import functools
import gzip
import io
import itertools
import json
import logging
import math
import os
import re
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from randomized import randomized
from test_checkpoints_mindspore import entry
from test_data_sources import MODES, exif_rotated, png_claiming

import vitkit
from vitkit.cli import main
from vitkit.data import read_skipped_tsv
from vitkit.data.archives import read_idx
from vitkit.train import RunConfig, load_config, loop, train
from vitkit.train.state import load_state, save_state

# ---- a dataset with every kind of bad file among good ones ----------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@functools.cache
def png_bomb(w: int, h: int) -> bytes:
    """A real grey PNG of w x h black pixels: about 70 KB on disk that would decode to w * h bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, rows = zlib.compressobj(9), b"\0" * (w + 1) * 500  # each row: filter byte 0, then w zero pixels
    idat = b"".join(z.compress(rows) for _ in range(h // 500)) + z.flush()
    header = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def extension(data: bytes) -> str:
    magic = {b"\x89PNG": ".png", b"GIF8": ".gif", b"P5": ".pgm", b"II*": ".tif", b"MM\0": ".tif", b"\xff\xd8": ".jpg"}
    return next(ext for head, ext in magic.items() if data.startswith(head))


def readable_files() -> dict[str, bytes]:
    """Files that look odd but are images: every mode, 1x1, 1xN, Nx1, EXIF-rotated, animated."""
    files = {f"mode_{re.sub(r'[^a-zA-Z0-9]+', '_', name)}{extension(d)}": d for name, (d, _) in MODES.items()}
    files |= {
        "one_pixel.png": encode(Image.new("RGB", (1, 1), (9, 8, 7))),
        "one_row.png": encode(Image.new("L", (40, 1), 99)),
        "one_column.jpg": encode(Image.new("RGB", (1, 30), (200, 10, 10)), "JPEG"),
        "exif_rotated.jpg": exif_rotated(),
    }
    return files


def bad_files(seed: int) -> dict[str, tuple[bytes, str]]:
    """name: (bytes, a part of the reason the skip list must give)."""
    jpeg = encode(noise(48, 64, seed), "JPEG")
    return {
        "empty.jpg": (b"", "empty file (0 bytes)"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "cannot decode"),
        "error_page.jpg": (b"<!DOCTYPE html><html><body>503 Service Unavailable</body></html>", "HTML"),
        "readme.png": (b"these are not the pixels you are looking for\n", "text file"),
        "bomb.png": (png_bomb(9000, 8000), "72000000 pixels is over the limit of 64000000"),
        "gigapixel.png": (png_claiming(100_000, 100_000), "decompression-bomb"),
        "zero_width.png": (png_claiming(0, 5), "corrupt or unsupported header"),
        "random.jpg": (bytes(np.random.default_rng(seed).integers(0, 256, 300, dtype=np.uint8)), "unknown format"),
    }


def corrupted_tree(root: Path) -> dict[str, str]:
    """root/{train,val}/{ant,bee}/...: 32 training files (11 of them bad) and 10 validation files (4 bad), so a
    batch of 8 tries every training file each epoch. Returns {path of each bad file: part of its reason}."""
    bad = {}
    train = [*readable_files().items(), ("plain.png", encode(noise(12, 10, 0)))]
    train += [(name, data) for name, (data, _) in bad_files(0).items()]
    train += [(f"more_{name}", data) for name, (data, _) in list(bad_files(1).items())[:3]]
    reasons = {name: why for name, (_, why) in bad_files(0).items()}
    reasons |= {f"more_{name}": why for name, (_, why) in list(bad_files(1).items())[:3]}
    val = [(f"v{i}.png", encode(noise(14, 11, 50 + i))) for i in range(6)]
    val += [(f"val_{name}", data) for name, (data, _) in list(bad_files(2).items())[:4]]
    reasons |= {f"val_{name}": why for name, (_, why) in list(bad_files(2).items())[:4]}
    assert len(train) == 32 and len(val) == 10
    for split, files in (("train", train), ("val", val)):
        for i, (name, data) in enumerate(files):
            path = root / split / ("ant", "bee")[i % 2] / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            if name in reasons:
                bad[str(path)] = reasons[name]
    return bad


TINY_RGB = {
    "model.img_size": 16,
    "model.overrides": {"patch_size": 4, "width": 16, "depth": 1, "heads": 2, "mlp_dim": 32},
    "data.workers": 0,
    "train.batch_size": 8,
    "train.eval_every": 0,
    "train.log_every": 1,
}


def assert_reasons(found: dict[str, str], expected: dict[str, str]) -> None:
    assert set(found) == set(expected)
    for where, part in expected.items():
        assert part in found[where], (where, found[where])


def test_a_corrupted_dataset_trains_evaluates_and_predicts_to_completion(tmp_path, caplog, capsys):
    bad = corrupted_tree(tmp_path / "data")
    val_bad = {w: r for w, r in bad.items() if "/val/" in w}
    run = tmp_path / "run"
    sets = [f"--set={k}={json.dumps(v)}" for k, v in {**TINY_RGB, "train.steps": 8}.items()]
    caplog.set_level(logging.INFO, logger="vitkit")
    assert main(["train", str(tmp_path / "data"), "--out", str(run), "--progress", "none", *sets]) == 0
    assert_reasons(read_skipped_tsv(run / "skipped.tsv"), bad)  # exactly the bad files, train and val
    assert f"skipped {len(bad)} unreadable image(s), listed in {run / 'skipped.tsv'}" in caplog.text
    assert_reasons(read_skipped_tsv(run / "eval" / "skipped.tsv"), val_bad)
    assert json.loads((run / "eval" / "metrics.json").read_text())["count"] == 6

    report = tmp_path / "report"
    args = ["eval", str(run / "model"), str(tmp_path / "data"), "--out", str(report), "--json"]
    capsys.readouterr()
    assert main(args) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["count"] == 6 and {s["where"] for s in metrics["skipped"]} == set(val_bad)
    assert_reasons(read_skipped_tsv(report / "skipped.tsv"), val_bad)
    before = (report / "metrics.json").read_bytes()
    assert main(args) == 2  # an existing report is never replaced without --overwrite
    assert "refusing to overwrite (pass --overwrite)" in capsys.readouterr().err
    assert (report / "metrics.json").read_bytes() == before
    assert main([*args, "--overwrite"]) == 0

    capsys.readouterr()
    # Every readable image is predicted; the exit status 1 says some were not.
    assert main(["predict", str(run / "model"), str(tmp_path / "data" / "train"), "--format", "json"]) == 1
    predictions = {p["path"]: p for p in json.loads(capsys.readouterr().out)}
    assert len(predictions) == 32
    for path, p in predictions.items():
        if path in bad:
            assert p["labels"] == [] and bad[path] in p["error"], p
        else:
            assert p["error"] is None and p["labels"][0] in ("ant", "bee"), p


def test_a_dataset_of_only_bad_files_stops_within_the_first_batches(tmp_path):
    for i in range(40):
        for cls in ("ant", "bee"):
            (tmp_path / "data" / cls).mkdir(parents=True, exist_ok=True)
            (tmp_path / "data" / cls / f"{i}.jpg").write_bytes(b"<html>gone</html>" if i % 2 else b"")
    cfg = load_config(None, {**TINY_RGB, "data.path": str(tmp_path / "data"), "data.val_fraction": 0.0})
    with pytest.raises(ValueError, match=r"none of the first 64 training images could be read \(for example .*"):
        train(cfg, tmp_path / "run", progress="none")
    assert len(read_skipped_tsv(tmp_path / "run" / "skipped.tsv")) == 64


def test_a_class_with_no_readable_image_stops_at_the_end_of_the_epoch(tmp_path):
    for i in range(8):
        (tmp_path / "data" / "ant").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "ant" / f"{i}.png").write_bytes(encode(noise(9, 9, i)))
    for i in range(4):
        (tmp_path / "data" / "bee").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "bee" / f"{i}.jpg").write_bytes(b"")
    overrides = {**TINY_RGB, "data.path": str(tmp_path / "data"), "data.val_fraction": 0.0, "train.batch_size": 4}
    cfg = load_config(None, {**overrides, "train.steps": 6, "train.save_every": 2})
    with pytest.raises(ValueError, match=r"not one image of class 'bee' could be read in epoch 0 \(4 tried\)"):
        train(cfg, tmp_path / "run", progress="none")
    assert load_state(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 2  # saved before the check


def test_a_batch_with_no_readable_image_is_a_step_without_update(tmp_path, caplog):
    for i in range(6):
        cls = ("ant", "bee")[i % 2]
        (tmp_path / "data" / cls).mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / cls / f"{i}.png").write_bytes(encode(noise(9, 9, i)) if i < 4 else b"")
    overrides = {**TINY_RGB, "data.path": str(tmp_path / "data"), "data.val_fraction": 0.0, "train.batch_size": 1}
    out = train(load_config(None, {**overrides, "train.steps": 6}), tmp_path / "run", progress="none")
    assert out["step"] == 6 and out["skipped"] == 2
    assert caplog.text.count("not one image of the batch could be read; no update") == 2


# ---- non-finite losses -----------------------------------------------------------------------------------------

DIGITS = {
    "model.img_size": 8,
    "model.overrides": {"patch_size": 2, "in_chans": 1, "width": 16, "depth": 1, "heads": 2, "mlp_dim": 32},
    "data.workers": 0,
    "train.batch_size": 32,
    "train.log_every": 1,
    "train.eval_every": 0,
    "train.save_every": 1,
}


REAL_LOSS, REAL_SAVE = loop.soft_cross_entropy, loop.save_state


def nan_at(monkeypatch, steps: set[int]) -> list[dict]:
    """Make the loss NaN at these steps (one forward per step here); return the states saved after each step."""
    calls, saved = [0], []

    def loss(logits, targets):
        calls[0] += 1
        out = REAL_LOSS(logits, targets)
        return out * math.nan if calls[0] - 1 in steps else out

    def save(path, state):
        saved.append({"step": state["step"], "model": {k: v.clone() for k, v in state["model"].items()}})
        REAL_SAVE(path, state)

    monkeypatch.setattr(loop, "soft_cross_entropy", loss)
    monkeypatch.setattr(loop, "save_state", save)
    return saved


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    saved = nan_at(monkeypatch, {3})
    with pytest.raises(FloatingPointError, match=r"step 3: the training loss is nan; stopped after 0 skipped"):
        train(load_config(None, {**DIGITS, "train.steps": 6}), tmp_path / "run", progress="none")
    state = load_state(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["step"] == 3 == saved[-1]["step"]
    assert all(torch.equal(state["model"][k], saved[-1]["model"][k]) for k in state["model"])
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_skip_nonfinite_skips_the_update_up_to_its_count(tmp_path, monkeypatch, caplog):
    saved = nan_at(monkeypatch, {1, 3})
    cfg = load_config(None, {**DIGITS, "train.steps": 5, "train.skip_nonfinite": 2})
    assert train(cfg, tmp_path / "run", progress="none")["step"] == 5
    assert "step 1: the training loss is nan; skipped the update (1 of train.skip_nonfinite=2)" in caplog.text
    assert "step 3: the training loss is nan; skipped the update (2 of train.skip_nonfinite=2)" in caplog.text
    weights = [s["model"] for s in saved]  # after steps 1, 2, 3, 4, 5 (step i is the i-th, counted from 1)
    same = [all(torch.equal(a[k], b[k]) for k in a) for a, b in itertools.pairwise(weights)]
    assert same == [True, False, True, False]  # the 2nd and 4th steps (indices 1 and 3) changed nothing
    records = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    assert [math.isnan(r["loss"]) for r in records if r["kind"] == "train"] == [False, True, False, True, False]

    saved = nan_at(monkeypatch, {0, 2})
    cfg = load_config(None, {**DIGITS, "train.steps": 5, "train.skip_nonfinite": 1})
    with pytest.raises(FloatingPointError, match=r"step 2: .* stopped after 1 skipped step\(s\)"):
        train(cfg, tmp_path / "run2", progress="none")


# ---- configuration and run directories -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data.path": "/no/such/dataset"}, "/no/such/dataset: no such file or directory"),
        ({"model.overrides.patch_size": 3}, r"img_size=\(8, 8\) is not divisible by the token stride 3"),
        ({"model.overrides.heads": 3}, "ViTConfig.width=16 is not divisible by heads=3"),
        ({"model.overrides.depth": "two"}, "ViTConfig.depth='two'; expected an integer >= 1"),
        ({"model.overrides.dropout": 1.5}, r"ViTConfig.dropout=1.5; expected a rate in \[0, 1\]"),
        ({"model.overrides.qkv_bias": "yes"}, "ViTConfig.qkv_bias='yes'; expected true or false"),
        ({"train.batch_size": 10, "train.accum_steps": 4}, "not divisible by train.accum_steps=4"),
        ({"train.skip_nonfinite": -1}, "train.skip_nonfinite=-1; expected >= 0"),
        ({"optim.lr": -1.0}, "optim.lr=-1.0; expected > 0"),
    ],
)
def test_bad_configuration_is_refused_before_the_run_directory_is_touched(tmp_path, changes, message):
    d = load_config(None, DIGITS).to_dict()
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = d
        for p in parents:
            node = node[p]
        node[leaf] = value
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train(RunConfig.from_dict(d), tmp_path / "run", progress="none")
    assert not (tmp_path / "run").exists()


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_the_start(tmp_path, caplog):
    cfg = load_config(None, {**DIGITS, "train.steps": 2})
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # all a kill may leave
    assert train(cfg, run, resume=True, progress="none")["step"] == 2
    assert "stopped before its first checkpoint; starting it over" in caplog.text
    with pytest.raises(ValueError, match="config differs"):
        train(load_config(None, {**DIGITS, "train.steps": 3}), run, resume=True, progress="none")


def test_a_malicious_training_state_is_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run = tmp_path / "run"
    cfg = load_config(None, {**DIGITS, "train.steps": 1})
    train(cfg, run, progress="none")
    state = load_state(run / "checkpoints" / "last.pt")
    state["optimizer"] = Exploit()
    torch.save(state, run / "checkpoints" / "last.pt")
    with pytest.raises(ValueError, match=r"last\.pt: not a readable vitkit training state \(UnpicklingError"):
        train(cfg, run, resume=True, progress="none")
    assert main(["train", "--resume", "--out", str(run), "--progress", "none"]) == 2
    assert "not a readable vitkit training state" in capsys.readouterr().err
    assert not marker.exists()


# ---- bad checkpoints --------------------------------------------------------------------------------------------


def tiny(width: int = 32) -> vitkit.VisionTransformer:
    cfg = vitkit.ViTConfig(img_size=(16, 16), patch_size=8, width=width, depth=1, heads=4, mlp_dim=32, num_classes=3)
    return randomized(cfg)


def written(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """(what to load, the file to damage) of a tiny model saved as `kind`."""
    model = tiny()
    if kind == "mindspore":
        path = tmp_path / "m.ckpt"
        path.write_bytes(b"".join(entry(k, v.numpy()) for k, v in model.state_dict().items()))
        return path, path
    if kind == "training state":
        path = tmp_path / "last.pt"
        save_state(path, {"step": 1, "best_top1": 0.0, "model": model.state_dict(), "optimizer": {}, "scaler": {}})
        return path, path
    to, name = kind.split(" ")
    out = vitkit.save_pretrained(model, tmp_path / name, to=to)
    weights = next(out.glob("*.safetensors")) if out.is_dir() else out
    return out, weights


FORMATS = ["vitkit m", "vitkit m.safetensors", "timm m.pth", "timm m.bin", "timm m.safetensors", "npz m.npz"]
FORMATS += ["hf m", "mindspore", "training state"]


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("damage", ["cut in half", "bytes flipped in the header"])
def test_truncated_or_corrupt_checkpoints_fail_naming_the_file(tmp_path, kind, damage):
    load, path = written(tmp_path, kind)
    data = bytearray(path.read_bytes())
    if damage == "cut in half":
        data = data[: len(data) // 2]
    else:
        data[8:40] = bytes(b ^ 0x5A for b in data[8:40])
    path.write_bytes(bytes(data))
    reader = load_state if kind == "training state" else vitkit.load_pretrained
    with pytest.raises(ValueError, match=str(path.name).replace(".", r"\.")):
        reader(load)


def test_weights_of_another_width_fail_naming_the_key_and_the_shapes(tmp_path):
    vitkit.save_pretrained(tiny(width=64), tmp_path / "w64.pth", to="timm")
    small = tiny(width=32).cfg
    shape = r"width=64 \(key 'patch_embed\.proj\.weight' has shape \(64, 3, 8, 8\)\)"
    with pytest.raises(ValueError, match=rf"w64\.pth: the file holds {shape}, but model .* has width=32"):
        vitkit.load_pretrained(tmp_path / "w64.pth", model=small)
    with pytest.raises(ValueError, match=rf"w64\.pth: the file holds {shape}; the override width=32"):
        vitkit.load_pretrained(tmp_path / "w64.pth", heads=4, width=32)
    sd = tiny(width=32).state_dict()
    sd["blocks.0.mlp.fc2.weight"] = torch.zeros(32, 64)  # one tensor of another model in the file
    torch.save(sd, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match=r"key 'blocks\.0\.mlp\.fc2\.weight' has shape \(32, 64\), the model expects"):
        vitkit.load_pretrained(tmp_path / "mixed.pth", heads=4)
    sd = tiny(width=32).state_dict()
    sd |= {k.replace("blocks.0.", "blocks.3."): v for k, v in sd.items() if k.startswith("blocks.0.")}
    torch.save(sd, tmp_path / "gap.pth")  # a block number damaged: 0 and 3, not a model of depth 4
    with pytest.raises(ValueError, match=r"gap\.pth: blocks \[1, 2\] are missing; the file has 2 blocks"):
        vitkit.load_pretrained(tmp_path / "gap.pth", heads=4)


# ---- what fuzzing found (each once escaped as another exception; benchmarks/fuzz.py) ----------------------------


def rezip(path: Path, change) -> None:
    """Rewrite a zip file (npz, torch) member by member through `change(name, data) -> data`."""
    with zipfile.ZipFile(path) as z:
        members = [(info, z.read(info)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in members:
            z.writestr(info, change(info.filename, data))


def encrypted_flag(path: Path) -> None:
    """Set the 'encrypted' flag of the first entry in the zip's central directory."""
    data = bytearray(path.read_bytes())
    at = data.index(b"PK\x01\x02") + 8  # general purpose bit flag
    data[at] |= 1
    path.write_bytes(bytes(data))


def test_damage_found_by_fuzzing_is_refused_naming_the_file(tmp_path):
    model = tiny()
    vitkit.save_pretrained(model, tmp_path / "m.npz", to="npz")
    encrypted_flag(tmp_path / "m.npz")  # zipfile: RuntimeError, "password required"
    with pytest.raises(ValueError, match=r"m\.npz: not a readable \.npz file.*RuntimeError"):
        vitkit.load_pretrained(tmp_path / "m.npz")

    vitkit.save_pretrained(model, tmp_path / "m.pth", to="timm")
    rezip(tmp_path / "m.pth", lambda name, data: b"\x80\x02t." if name.endswith("data.pkl") else data)
    with pytest.raises(ValueError, match=r"m\.pth: not a readable PyTorch file.*IndexError"):  # a pop from nothing
        vitkit.load_pretrained(tmp_path / "m.pth")

    gz = tmp_path / "train-images-idx3-ubyte.gz"
    data = bytearray(gzip.compress(bytes(range(40)) * 3))
    data[12] ^= 0xFF  # zlib.error inside gzip
    gz.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: cannot read"):
        read_idx(gz)

    vitkit.save_pretrained(model, tmp_path / "v")
    record = json.loads((tmp_path / "v" / "vitkit.json").read_text())
    (tmp_path / "v" / "vitkit.json").write_text(json.dumps({**record, "classes": True}))
    with pytest.raises(ValueError, match=r"vitkit\.json: vitkit record has classes=True; expected a list"):
        vitkit.load_pretrained(tmp_path / "v")

    vitkit.save_pretrained(model, tmp_path / "hf", to="hf")
    for name, key, value, expected in [
        ("preprocessor_config.json", "size", 1.5, "an integer or an object or null"),
        ("preprocessor_config.json", "size", {"shortest_edge": 0}, "expected sizes in pixels"),
        ("config.json", "num_attention_heads", [2], "expected an integer"),
        ("config.json", "hidden_act", ["gelu"], "expected a string"),
    ]:
        path = tmp_path / "hf" / name
        original = path.read_text()
        path.write_text(json.dumps({**json.loads(original), key: value}))
        with pytest.raises(ValueError, match=rf"{name}: {key}=.*{expected}"):
            vitkit.load_pretrained(tmp_path / "hf")
        path.write_text(original)
