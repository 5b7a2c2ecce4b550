import contextlib

import pytest
import torch
import torch.nn.functional as F
from test_train import tiny

from vitkit import create_model, load_pretrained, save_pretrained
from vitkit.data import open_source
from vitkit.data.augment import normalize
from vitkit.evaluate import evaluate
from vitkit.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from vitkit.train import load_config, train
from vitkit.train.config import DistillConfig
from vitkit.train.distill import Teachers, renormalize
from vitkit.train.loop import run_config

TINY_MODEL = {"patch_size": 2, "in_chans": 1, "width": 32, "depth": 2, "heads": 2, "mlp_dim": 64, "num_classes": 3}


def test_targets_mix_the_labels_with_the_mean_of_the_teachers_probabilities():
    torch.manual_seed(0)
    models = [create_model("vit_ti16", img_size=8, **TINY_MODEL).eval() for _ in range(2)]
    x = torch.randn(5, 1, 8, 8)
    labels = F.one_hot(torch.tensor([0, 1, 2, 0, 1]), 3).float()
    with torch.no_grad():
        mean = (models[0](x).softmax(-1) + models[1](x).softmax(-1)) / 2
    prep = models[0].preprocess
    soft = Teachers(models, prep, DistillConfig(weight=0.25), contextlib.nullcontext()).targets(x, labels)
    torch.testing.assert_close(soft, 0.75 * labels + 0.25 * mean)
    assert torch.allclose(soft.sum(-1), torch.ones(5))
    hard = Teachers(models, prep, DistillConfig(weight=0.5, hard=True), contextlib.nullcontext()).targets(x, labels)
    torch.testing.assert_close(hard, 0.5 * labels + 0.5 * F.one_hot(mean.argmax(-1), 3).float())


def test_renormalize_gives_what_the_teachers_own_normalisation_gives():
    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    half, imagenet = Preprocess(), Preprocess(mean=IMAGENET_MEAN, std=IMAGENET_STD)
    moved = renormalize(normalize(pixels, half.mean, half.std), half, imagenet)
    torch.testing.assert_close(moved, normalize(pixels, imagenet.mean, imagenet.std))


def _shifted_teacher(tmp_path):
    """A digits classifier at 12 px (the student trains at 8) whose head says (true class + 1) mod 10."""
    out = train(
        tiny(**{"model.img_size": 12, "train.steps": 300, "optim.lr": 3e-3, "train.eval_every": 0}),
        tmp_path / "teacher-run",
        progress="none",
    )
    assert out["top1"] > 0.5
    model = load_pretrained(tmp_path / "teacher-run" / "model")
    with torch.no_grad():  # output c + 1 reads the weights of output c
        model.head.weight.copy_(model.head.weight.roll(1, dims=0))
        model.head.bias.copy_(model.head.bias.roll(1, dims=0))
    return save_pretrained(model, tmp_path / "teacher")


def shifted_share(result) -> float:
    """The share of the images predicted as their class + 1 (mod 10)."""
    c = result.confusion
    return float(sum(c[k, (k + 1) % 10] for k in range(10)) / c.sum())


def test_a_student_distilled_with_weight_1_learns_the_teacher_not_the_labels(tmp_path):
    teacher = _shifted_teacher(tmp_path)
    val = open_source(None, "val")
    assert shifted_share(evaluate(load_pretrained(teacher), val)) > 0.5
    run = tmp_path / "student"
    steps = {"train.steps": 300, "optim.lr": 3e-3, "train.eval_every": 0}
    train(tiny(**steps, **{"distill.teachers": str(teacher), "distill.weight": 1.0}), run, progress="none")
    student = evaluate(load_pretrained(run / "model"), val)
    assert shifted_share(student) > 0.5 and student.top1 < 0.1  # chance is 0.1 either way
    assert run_config(run).distill.teachers == [str(teacher)]  # a resumed run distils from the same teachers


def test_teachers_are_refused_before_the_run_starts_when_they_do_not_fit(tmp_path):
    other = save_pretrained(create_model("vit_ti16", img_size=8, **TINY_MODEL), tmp_path / "three-classes")
    with pytest.raises(ValueError, match=r"three-classes predicts 3 unnamed classes; the training data has \['0'"):
        train(tiny(**{"train.steps": 1, "distill.teachers": [str(other)]}), tmp_path / "run", progress="none")
    assert not (tmp_path / "run").exists()
    rgb = create_model("vit_ti16", img_size=8, **{**TINY_MODEL, "in_chans": 3, "num_classes": 10})
    rgb.classes = [str(i) for i in range(10)]
    rgb_path = save_pretrained(rgb, tmp_path / "rgb")
    with pytest.raises(ValueError, match="rgb takes 3-channel images; the student takes 1"):
        train(tiny(**{"train.steps": 1, "distill.teachers": [str(rgb_path)]}), tmp_path / "run", progress="none")
    with pytest.raises(FileNotFoundError, match=r"distill.teachers: nowhere/model: no such checkpoint"):
        load_config(None, {"distill.teachers": ["nowhere/model"]})
    for weight in (0.0, 1.5):
        with pytest.raises(ValueError, match=rf"distill.weight={weight}; expected a fraction in \(0, 1\]"):
            load_config(None, {"distill.weight": weight})
