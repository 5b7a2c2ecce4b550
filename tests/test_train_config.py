import re

import pytest

from vitkit.train.config import RECIPES, RunConfig, list_recipes, load_config

CONFIGS = sorted(RECIPES.glob("*.yaml"))


def test_defaults_round_trip_through_dict():
    cfg = RunConfig()
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["augment"]["crop_scale"] == [0.08, 1.0]  # tuples dump as plain YAML lists


@pytest.mark.parametrize("recipe", CONFIGS, ids=lambda p: p.stem)
def test_every_recipe_loads_and_states_what_it_reaches(recipe):
    cfg = load_config(recipe)
    head = recipe.read_text().split("\n\n")[0]
    for line in ("command:", "hardware:", "time:", "reaches:"):
        assert line in head, f"{recipe.name} must state its {line}"
    assert cfg != RunConfig()


def test_recipe_then_dotted_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim: {lr: 0.1, name: sgd}\nmodel: {overrides: {patch_size: 4}}\n")
    cfg = load_config(recipe, {"optim.lr": 3e-4, "train.epochs": 2, "model.overrides.drop_path": 0.1})
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 3e-4 and cfg.train.epochs == 2.0
    assert cfg.model.overrides == {"patch_size": 4, "drop_path": 0.1}


def test_ints_become_floats_and_lists_become_tuples():
    cfg = load_config(None, {"optim.lr": 1, "augment.crop_scale": [0.5, 1], "schedule.min_lr": "1e-5"})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.schedule.min_lr == 1e-5  # YAML reads 1e-5 (no dot) as text
    assert cfg.augment.crop_scale == (0.5, 1.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optim.lrr": 1}, "unknown field 'lrr'"),
        ({"optimizer.lr": 1}, "unknown section 'optimizer'"),
        ({"lr": 1}, "expected section.field"),
        ({"optim.lr": "fast"}, "optim.lr='fast': expected float"),
        ({"train.batch_size": 2.5}, "train.batch_size=2.5: expected int"),
        ({"train.epochs": True}, "expected float"),
        ({"augment.crop_scale": [0.5]}, "expected a list of 2"),
        ({"train.batch_size": 10, "train.accum_steps": 3}, "not divisible by train.accum_steps=3"),
        ({"train.precision": "fp8"}, "expected fp32, bf16, fp16 or auto"),
        ({"optim.name": "lamb"}, "expected adamw, adam or sgd"),
        ({"optim.freeze": "last:x"}, "expected none, head or last:N"),
        ({"augment.crop_scale": [0.9, 0.5]}, "0 < min <= max <= 1"),
        ({"train.ema_decay": 1.5}, "expected a value in (0, 1)"),
        ({"train.skip_nonfinite": 1.5}, "train.skip_nonfinite=1.5: expected int"),
        ({"data.workers": -1}, "data.workers=-1; expected >= 0"),
        ({"data.cache": "lots"}, "data.cache='lots': memory size 'lots'; expected a number and a unit"),
        ({"model.overrides.patch_size": 5}, "is not divisible by the token stride 5 (patch_size=5"),
        ({"model.overrides.heads": 5}, "ViTConfig.width=192 is not divisible by heads=5"),
        ({"model.overrides.hybrid": [1], "model.overrides.stem_width": 48}, "ViTConfig.stem_width=48: the hybrid"),
        ({"model.overrides.width": "wide"}, "ViTConfig.width='wide'; expected an integer >= 1"),
        ({"model.overrides.patch": 4}, "unknown ViTConfig field(s) ['patch']"),
        ({"model.name": "vit_q7"}, "unknown model name 'vit_q7'"),
    ],
)
def test_bad_configuration_is_refused_with_the_field(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, overrides)


def test_unknown_recipe_key_names_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim: {learning_rate: 0.1}\n")
    with pytest.raises(ValueError, match=r"r\.yaml:optim: unknown key 'learning_rate'"):
        load_config(recipe)
    with pytest.raises(FileNotFoundError, match="no such recipe file, and not a built-in recipe"):
        load_config(tmp_path / "missing.yaml")


def test_built_in_recipes_by_name():
    assert {"digits", "official_finetune", "deit_s"} <= set(list_recipes())
    assert load_config("digits") == load_config(RECIPES / "digits.yaml")


def test_a_missing_init_checkpoint_is_refused_when_the_config_loads():
    with pytest.raises(FileNotFoundError, match=r"model\.init='/no/such\.npz': no such checkpoint file"):
        load_config(None, {"model.init": "/no/such.npz"})
