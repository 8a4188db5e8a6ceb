"""Test-time adaptation in ``trainer.test``: a thin callback around ``modules.adaptation.Adapter``.

The benchmark's ``test_step`` plays every object on an ``InteractiveSession``, which calls the
module's ``adapter``; this callback builds that adapter when testing starts (on every DDP rank,
with the gradient averaging SA's ``synchronize`` asks for) and removes it afterwards.

A variant (``configs/adapt/<name>.yaml``) holds ``image:`` (IA's settings) and/or ``sequence:``
(SA's), ``zoom_in:`` (RITM's zoom-in at inference, ``modules.session.ZoomIn``) and ``tta:``
(predictions averaged over a mirrored or rescaled input, ``modules.session.TestTimeAugmentation``)
and ``click_labels:`` (the clicks as labels on the shown mask, ``modules.session.ClickLabels``;
radius 1 px when a variant does not say), all usable with any of them, or ``random_walker:``
(a classical baseline instead of the network);
a value that is a string takes that part from another variant, so IA+SA restates nothing::

    image: ia          # configs/adapt/ia.yaml's image settings
    sequence: sa       # configs/adapt/sa.yaml's sequence settings
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import yaml

from modules.adaptation import Adapter, ImageAdaptation, SequenceAdaptation, settings
from modules.classical import RandomWalker
from modules.errors import UserError
from modules.session import ClickLabels, TestTimeAugmentation, ZoomIn

PARTS = {"image": ImageAdaptation, "sequence": SequenceAdaptation, "zoom_in": ZoomIn, "tta": TestTimeAugmentation,
         "click_labels": ClickLabels, "random_walker": RandomWalker}


def average_across_ranks(tensors) -> None:
    """Average the gradients of ``tensors`` over the DDP process group (SA's ``synchronize``)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    for p in tensors:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


class TestTimeAdaptation(pl.Callback):
    """Adapt the model during ``trainer.test`` (paper A, sec. 3.2): IA, SA or both.

    Needs ``Trainer(inference_mode=False)``; the module stays in eval mode (normalisation layers
    use their running statistics at batch size 1). The MAS importance is the module's
    ``mas_importance`` (from ``<ckpt>.mas.pt``).

    Args:
        image: image adaptation's settings (``modules.adaptation.ImageAdaptation``), or none.
        sequence: sequence adaptation's settings (``modules.adaptation.SequenceAdaptation``), or none.
        zoom_in: RITM's zoom-in at inference (``modules.session.ZoomIn``), or none.
        tta: test-time augmentation of predictions (``modules.session.TestTimeAugmentation``), or none.
        click_labels: the clicks as labels on the shown mask (``modules.session.ClickLabels``), or none.
    """

    def __init__(self, image: ImageAdaptation | None = None, sequence: SequenceAdaptation | None = None,
                 zoom_in: ZoomIn | None = None, tta: TestTimeAugmentation | None = None,
                 click_labels: ClickLabels | None = None):
        self.image, self.sequence, self.zoom_in, self.tta = image, sequence, zoom_in, tta
        self.click_labels = click_labels
        self.adapter: Adapter | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.adapter = Adapter(pl_module, self.image, self.sequence, pl_module.mas_importance, rank=trainer.global_rank,
                               reduce_gradients=average_across_ranks)
        self.attach(pl_module, self.adapter)

    def attach(self, module: pl.LightningModule, adapter: Adapter | None) -> None:
        """Give ``module``'s sessions this variant: ``adapter`` (built on ``module``) and the
        predictor's parts. The benchmark attaches in ``setup``; the annotation app per image."""
        module.adapter, module.zoom_in, module.tta, module.click_labels = adapter, self.zoom_in, self.tta, self.click_labels

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        TestTimeAdaptation().attach(pl_module, None)  # the network alone again


class ClassicalBaseline(pl.Callback):
    """Benchmark a classical method (``modules.classical``) in place of the network: the module's
    test step then plays every object on it, with the same simulated user.

    Args:
        method: the method, e.g. ``modules.classical.RandomWalker(beta=90)``.
    """

    def __init__(self, method: RandomWalker):
        self.method = method
        self.adapter = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.classical = self.method

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.classical = None


def resolve_parts(raw: Any, adapt_dir: str | Path, where: str, seen: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """A variant's ``image`` / ``sequence`` settings, with parts that name another variant read
    from ``<adapt_dir>/<name>.yaml``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict) or set(raw) - set(PARTS):
        raise UserError(f"{where}: expected the keys {sorted(PARTS)} (or none), got {raw!r:.200}")
    parts = {}
    for part, value in raw.items():
        if isinstance(value, str):
            value = read_variant(value, adapt_dir, seen).get(part)
            if value is None:
                raise UserError(f"{where}: {part}: variant '{raw[part]}' has no {part} settings")
        if not isinstance(value, dict):
            raise UserError(f"{where}: {part}: expected a mapping or a variant name, got {value!r}")
        parts[part] = value
    return parts


def read_variant(name: str, adapt_dir: str | Path, seen: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """The settings of variant ``name`` (``<adapt_dir>/<name>.yaml``), references resolved."""
    adapt_dir = Path(adapt_dir)
    path = adapt_dir / f"{name}.yaml"
    if not path.is_file():
        known = sorted(str(p.relative_to(adapt_dir).with_suffix("")) for p in adapt_dir.rglob("*.yaml"))
        raise UserError(f"unknown variant '{name}': no {path} (expected one of {known})")
    if name in seen:
        raise UserError(f"variant '{name}' refers to itself through {' -> '.join(seen + (name,))}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"variant config '{path}' is not valid YAML: {' '.join(str(e).split())[:200]}") from e
    return resolve_parts(raw, adapt_dir, f"variant config '{path}'", seen + (name,))


def variant_parts(variant: str | dict[str, Any], adapt_dir: str | Path) -> dict[str, Any]:
    """A variant's parts as settings objects, from a name (``fixed``: no part, the weights
    never change) read from ``<adapt_dir>/<name>.yaml``, or an inline ``{name: ..., image: ...,
    sequence: ...}``; a network variant without ``click_labels`` gets the default ``ClickLabels()``."""
    if isinstance(variant, str):
        name, parts = variant, read_variant(variant, adapt_dir)
    else:
        name = variant.get("name")
        if not name:
            raise UserError(f"inline variant {variant!r:.200}: needs a 'name'")
        parts = resolve_parts({k: v for k, v in variant.items() if k != "name"}, adapt_dir, f"variant '{name}'")
    built = {part: settings(PARTS[part], values, f"variant '{name}': {part}") for part, values in parts.items()}
    if "random_walker" in built and len(built) > 1:
        raise UserError(f"variant '{name}': a classical method does not adapt, zoom or augment "
                        "(no image/sequence/zoom_in/tta/click_labels with it)")
    if "random_walker" not in built:
        built.setdefault("click_labels", ClickLabels())
    return built


def variant_spec(variant: str | dict[str, Any], adapt_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every setting a variant runs with, resolved (defaults included) as plain data: what a
    results file records, so that a variant whose settings changed is not mistaken for its old run."""
    return as_read_back({part: asdict(obj) for part, obj in variant_parts(variant, adapt_dir).items()})


def as_read_back(settings_data: Any) -> Any:
    """Settings as a results file reads them back (tuples as lists)."""
    return json.loads(json.dumps(settings_data))


def same_settings(recorded: dict[str, dict[str, Any]], spec: dict[str, dict[str, Any]]) -> bool:
    """Whether a results file's record of a variant's settings (``variant_spec``) describes
    ``spec``: a setting added to a part after the record was written matches its default."""
    if recorded.keys() != spec.keys():
        return False
    for part, values in spec.items():
        defaults = as_read_back(asdict(PARTS[part]()))
        old = recorded[part]
        if not old.keys() <= values.keys():
            return False
        if any(v != (old[k] if k in old else defaults[k]) for k, v in values.items()):
            return False
    return True


def variant_callback(variant: str | dict[str, Any], adapt_dir: str | Path) -> TestTimeAdaptation | ClassicalBaseline:
    """A fresh callback for a variant (see ``variant_parts``)."""
    built = variant_parts(variant, adapt_dir)
    if "random_walker" in built:
        return ClassicalBaseline(built["random_walker"])
    return TestTimeAdaptation(**built)
