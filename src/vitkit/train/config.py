"""The training configuration: typed dataclasses, read from recipe YAML files and dotted `--set` overrides.

A recipe (a YAML file, or the name of one in `vitkit/recipes/`) has one mapping per section (`data`, `augment`,
`model`, `optim`, `schedule`, `train`, `distill`); anything left out keeps the defaults below. The resolved config
is written into every run directory and is what a resumed run reads back.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..models import resolve_config
from ..sizes import parse_size

RECIPES = Path(__file__).parents[1] / "recipes"


@dataclass
class DataConfig:
    """Where the images come from (see `vitkit.data.open_source` for the accepted forms of `path`)."""

    path: str | None = None  # None: the embedded handwritten digits
    train_split: str = "train"
    val_split: str = "val"  # CIFAR and IDX call it "test"; both names work
    val_fraction: float = 0.1  # held out of a tree that has no val/ folder, by a seeded class-stratified shuffle
    split_seed: int = 0  # the seed of that split (`vitkit eval --split-seed` takes the same), apart from train.seed
    workers: int = 2  # decoding processes; 0 decodes in the training process
    # Decoded training images kept in memory up to this size per decoding process, e.g. "1GiB", so that later epochs
    # crop them without reading or decoding the files again; None: off. CIFAR-10's 50,000 images take 147 MiB.
    cache: str | None = None


@dataclass
class AugmentConfig:
    """Training augmentation. Cropping runs on the loader workers; the rest runs batched on the device."""

    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction; (1, 1) keeps the whole image
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5  # probability
    randaugment_ops: int = 0  # RandAugment N (0: off)
    randaugment_magnitude: float = 9.0  # RandAugment M on the 0-10 scale
    mixup: float = 0.0  # Beta(alpha, alpha) for mixup (0: off)
    cutmix: float = 0.0  # Beta(alpha, alpha) for cutmix (0: off); with both on, each batch picks one at random
    mix_prob: float = 1.0  # probability that a batch is mixed at all
    erasing: float = 0.0  # random-erasing probability per image
    label_smoothing: float = 0.0


@dataclass
class ModelConfig:
    name: str = "vit_ti16"  # a variant name (`vitkit models`), used when `init` is not given
    init: str | None = None  # a checkpoint of any format to start from
    reinit_blocks: int = 0  # with init: fresh weights for the last N blocks (a model from scratch is fresh already)
    img_size: int | tuple[int, int] | None = None  # None: the variant's or the checkpoint's
    overrides: dict[str, Any] = field(default_factory=dict)  # ViTConfig fields, e.g. {patch_size: 4, drop_path: 0.1}
    grad_checkpointing: bool = False  # recompute block activations in backward: less memory, about 1/3 more time


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3  # peak learning rate for the global batch
    weight_decay: float = 0.05  # decoupled for adamw; skipped for norms, biases, position embeddings, class token
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9  # sgd
    clip_grad: float | None = None  # global gradient-norm clip
    layer_decay: float | None = None  # layer-wise lr decay: block i of L gets lr * decay ** (L + 1 - layer)
    freeze: str = "none"  # none | head (a linear probe: train only the head) | last:N (train the last N blocks)


@dataclass
class ScheduleConfig:
    warmup_steps: int = 0
    warmup_epochs: float = 0.0  # added to warmup_steps, converted with the epoch's step count
    decay: str = "cosine"  # cosine | linear | constant
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    epochs: float = 10  # ignored when steps is set
    steps: int | None = None  # optimizer steps in all
    batch_size: int = 128  # global batch per optimizer step (all ranks and accumulation steps together)
    accum_steps: int = 1
    # fp32 | bf16 (autocast, CPU and GPU) | fp16 (autocast with loss scaling, GPU) | auto (bf16 where the device
    # computes it natively, else fp16 on a GPU and fp32 on a CPU: `vitkit.evaluate.auto_precision`)
    precision: str = "fp32"
    compile: bool = False  # torch.compile the training forward and backward (pays on a GPU; slower on CPU)
    ema_decay: float | None = None  # keep an exponential moving average of the weights; evaluated and saved
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_every: float = 1.0  # epochs between evaluations (and best-checkpoint updates); 0: only at the end
    eval_flip: bool = False  # evaluate with each image's probabilities averaged with its mirror image's (`--flip`)
    save_every: int = 0  # optimizer steps between `last` checkpoints; 0: at each evaluation
    log_every: int = 10  # optimizer steps between metric lines
    skip_nonfinite: int = 0  # steps with a NaN/inf loss skipped (no update, a warning) before the run stops


@dataclass
class DistillConfig:
    """Knowledge distillation (`vitkit.train.distill`): targets mixed with the teachers' predictions."""

    teachers: list[str] = field(default_factory=list)  # checkpoints of any format, with the run's classes; averaged
    weight: float = 0.5  # the teachers' share of each target: (1 - weight) * labels + weight * teachers
    hard: bool = False  # the teachers' top class as a one-hot label (DeiT's hard distillation) instead of probabilities


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> RunConfig:
        return _build(cls, d, where)

    def validate(self) -> None:
        """Refuse impossible combinations before any work starts."""
        t, o, a = self.train, self.optim, self.augment
        if t.batch_size < 1 or t.accum_steps < 1:
            raise ValueError(f"train.batch_size={t.batch_size}, train.accum_steps={t.accum_steps}: must be >= 1")
        if t.batch_size % t.accum_steps:
            raise ValueError(f"train.batch_size={t.batch_size} is not divisible by train.accum_steps={t.accum_steps}")
        if t.precision not in ("fp32", "bf16", "fp16", "auto"):
            raise ValueError(f"train.precision={t.precision!r}; expected fp32, bf16, fp16 or auto")
        if o.name not in ("adamw", "adam", "sgd"):
            raise ValueError(f"optim.name={o.name!r}; expected adamw, adam or sgd")
        if self.schedule.decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule.decay={self.schedule.decay!r}; expected cosine, linear or constant")
        if not (o.freeze in ("none", "head") or (o.freeze.startswith("last:") and o.freeze[5:].isdigit())):
            raise ValueError(f"optim.freeze={o.freeze!r}; expected none, head or last:N (N blocks trained)")
        if (t.steps is None and t.epochs <= 0) or (t.steps is not None and t.steps < 1):
            raise ValueError(f"train.epochs={t.epochs}, train.steps={t.steps}: nothing to train")
        if t.ema_decay is not None and not 0 < t.ema_decay < 1:
            raise ValueError(f"train.ema_decay={t.ema_decay}; expected a value in (0, 1)")
        lo, hi = a.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"augment.crop_scale={a.crop_scale}; expected 0 < min <= max <= 1")
        if not 0 <= self.data.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.data.val_fraction}; expected a fraction in [0, 1)")
        for section, values in self.to_dict().items():
            for name, value in values.items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"{section}.{name}={value}; expected a finite number")
        s = self.schedule
        at_least = {  # field: (value, least allowed, whether the least is allowed)
            "optim.lr": (o.lr, 0, False),
            "optim.weight_decay": (o.weight_decay, 0, True),
            "optim.clip_grad": (o.clip_grad, 0, False),
            "optim.layer_decay": (o.layer_decay, 0, False),
            "schedule.warmup_steps": (s.warmup_steps, 0, True),
            "schedule.warmup_epochs": (s.warmup_epochs, 0, True),
            "schedule.min_lr": (s.min_lr, 0, True),
            "train.eval_every": (t.eval_every, 0, True),
            "train.save_every": (t.save_every, 0, True),
            "train.log_every": (t.log_every, 1, True),
            "train.skip_nonfinite": (t.skip_nonfinite, 0, True),
            "data.workers": (self.data.workers, 0, True),
            "model.reinit_blocks": (self.model.reinit_blocks, 0, True),
        }
        for name, (value, least, inclusive) in at_least.items():
            if value is not None and (value < least or (value == least and not inclusive)):
                raise ValueError(f"{name}={value}; expected {'>=' if inclusive else '>'} {least}")
        if self.data.cache is not None:
            try:
                parse_size(self.data.cache)
            except ValueError as e:
                raise ValueError(f"data.cache={self.data.cache!r}: {e}") from None
        if not 0 < self.distill.weight <= 1:
            raise ValueError(f"distill.weight={self.distill.weight}; expected a fraction in (0, 1]")
        for path in self.distill.teachers:
            if not Path(path).exists():
                raise FileNotFoundError(f"distill.teachers: {path}: no such checkpoint file or directory")
        self._validate_model()

    def _validate_model(self) -> None:
        """Build the model's config (no weights) so that a bad name, override or size is refused now."""
        m = self.model
        if m.init is not None:
            if not Path(m.init).exists():
                raise FileNotFoundError(f"model.init={m.init!r}: no such checkpoint file or directory")
            return  # the file settles the architecture; load_pretrained checks the overrides against it
        overrides = dict(m.overrides)
        if m.img_size is not None:
            overrides["img_size"] = m.img_size
        try:
            resolve_config(m.name, **overrides)
        except (TypeError, ValueError) as e:
            raise ValueError(f"model (name={m.name!r}, overrides={overrides}): {e}") from None


def list_recipes() -> list[str]:
    """The recipes that ship with vitkit (`--recipe NAME`); each file says what it should reach."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def recipe_path(recipe: str | Path) -> Path:
    """A recipe file: a path, or the name of one that ships with vitkit."""
    path = Path(recipe)
    if path.is_file():
        return path
    if (RECIPES / f"{recipe}.yaml").is_file():
        return RECIPES / f"{recipe}.yaml"
    raise FileNotFoundError(f"{recipe}: no such recipe file, and not a built-in recipe ({', '.join(list_recipes())})")


def load_config(recipe: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then the recipe (a file or a built-in name), then dotted overrides ({"optim.lr": 3e-4}); validated."""
    d = RunConfig().to_dict()
    if recipe is not None:
        path = recipe_path(recipe)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a readable YAML recipe ({e})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a recipe is a mapping of sections (data, augment, model, ...)")
        _merge(d, loaded, str(path))
    for key, value in (overrides or {}).items():
        *parents, leaf = key.split(".")
        if not parents:
            raise ValueError(f"--set {key}: expected section.field, e.g. optim.lr")
        node = d
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ValueError(f"--set {key}: unknown section {p!r}; known: {sorted(k for k in node)}")
            node = node[p]
        if leaf not in node and parents != ["model", "overrides"]:
            raise ValueError(f"--set {key}: unknown field {leaf!r}; known: {sorted(node)}")
        node[leaf] = value
    cfg = RunConfig.from_dict(d, "config")
    cfg.validate()
    return cfg


def _merge(base: dict, new: dict, where: str) -> None:
    for key, value in new.items():
        if key not in base:
            raise ValueError(f"{where}: unknown key {key!r}; known: {sorted(base)}")
        if isinstance(base[key], dict) and isinstance(value, dict) and key != "overrides":
            _merge(base[key], value, f"{where}:{key}")
        else:
            base[key] = value


def _build(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**{k: _coerce(hints[k], v, f"{where}.{k}") for k, v in d.items()})


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check a YAML value against a field's type (ints are accepted for floats, lists for tuples)."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}={value!r}: expected {_name(hint)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where}={value!r}: expected a list of {len(args)} ({_name(hint)})")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value, strict=True))
    if origin is list:
        if isinstance(value, str):  # one path for a list of paths
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}={value!r}: expected a list ({_name(hint)})")
        return [_coerce(args[0], v, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}={value!r}: expected a mapping")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is Any or (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise ValueError(f"{where}={value!r}: expected {_name(hint)}")


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _plain(x: Any) -> Any:
    """Tuples -> lists, so the dict dumps as plain YAML."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
