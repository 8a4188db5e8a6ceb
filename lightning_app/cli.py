"""The command line: LightningCLI for fit/validate/test, a jsonargparse parser for benchmark.

    python -m lightning_app fit --config configs/train_init.yaml
    python -m lightning_app benchmark --config configs/benchmark.yaml --ckpt path.ckpt
    python -m lightning_app <subcommand> --help | --print_config
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")  # no network here; `wandb sync` later

from jsonargparse import ActionConfigFile, ArgumentParser  # noqa: E402
from pytorch_lightning.cli import LightningCLI  # noqa: E402

from datamodules.datamodule import InteractiveDataModule  # noqa: E402
from lightning_app.benchmark import run_benchmark  # noqa: E402
from modules.errors import UserError  # noqa: E402
from modules.interactive import InteractiveSegmentationModule  # noqa: E402


def benchmark_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m lightning_app benchmark", description=run_benchmark.__doc__.split("\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (configs/benchmark.yaml)")
    parser.add_function_arguments(run_benchmark, skip={"data"})
    parser.add_class_arguments(InteractiveDataModule, "data")
    return parser


def benchmark_main(argv: list[str]) -> dict:
    parser = benchmark_parser()
    cfg = parser.parse_args(argv)
    init = parser.instantiate_classes(cfg)
    kwargs = {k: v for k, v in init.items() if k != "config"}
    return run_benchmark(**kwargs)


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
        if argv and argv[0] == "benchmark":
            benchmark_main(argv[1:])
        else:
            lightning_main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
