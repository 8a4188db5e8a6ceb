"""The command line: LightningCLI for fit/validate/test, jsonargparse parsers for the
plain-function subcommands (benchmark, importance, evolve).

    python -m lightning_app fit --config configs/train_init.yaml
    python -m lightning_app importance --ckpt path.ckpt
    python -m lightning_app evolve --config configs/evolve.yaml [--stages [fundus,rooftop]]
    python -m lightning_app benchmark --config configs/benchmark.yaml --ckpt path.ckpt
    python -m lightning_app <subcommand> --help | --print_config
"""
from __future__ import annotations

import inspect
import os
import sys
import warnings

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")  # no network here; `wandb sync` later
# the training stream shards itself across workers (datamodules/streaming.py), as this warns to
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined")

from jsonargparse import ActionConfigFile, ArgumentParser  # noqa: E402
from pytorch_lightning.cli import LightningCLI  # noqa: E402

from datamodules.datamodule import InteractiveDataModule  # noqa: E402
from lightning_app.benchmark import run_benchmark  # noqa: E402
from lightning_app.evolve import run_evolution  # noqa: E402
from lightning_app.importance import compute_importance  # noqa: E402
from modules.errors import UserError  # noqa: E402
from modules.interactive import InteractiveSegmentationModule  # noqa: E402


FUNCTIONS = {"benchmark": run_benchmark, "importance": compute_importance, "evolve": run_evolution}
"""Subcommands that are plain functions (of options, and of ``data`` when they take it)."""


def function_parser(name: str) -> ArgumentParser:
    fn = FUNCTIONS[name]
    parser = ArgumentParser(prog=f"python -m lightning_app {name}", description=fn.__doc__.split("\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (see configs/)")
    parser.add_function_arguments(fn, skip={"data"})
    if "data" in inspect.signature(fn).parameters:
        parser.add_class_arguments(InteractiveDataModule, "data")
    return parser


def function_main(name: str, argv: list[str]):
    parser = function_parser(name)
    init = parser.instantiate_classes(parser.parse_args(argv))
    return FUNCTIONS[name](**{k: v for k, v in init.items() if k != "config"})


def lightning_main(argv: list[str]) -> None:
    LightningCLI(
        InteractiveSegmentationModule,
        InteractiveDataModule,
        args=None if argv == sys.argv[1:] else argv,  # LightningCLI warns when given both
        save_config_kwargs={"overwrite": True},
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in FUNCTIONS:
            function_main(argv[0], argv[1:])
        else:
            lightning_main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
