"""The command line: LightningCLI for fit/validate/test, jsonargparse parsers for the
plain-function subcommands (benchmark, importance, evolve).

    python -m lightning_app fit --config configs/train_init.yaml
    python -m lightning_app importance --ckpt path.ckpt
    python -m lightning_app evolve --config configs/evolve.yaml [--stages [fundus,rooftop]]
    python -m lightning_app benchmark --config configs/benchmark.yaml --ckpt path.ckpt
    python -m lightning_app spread --runs [runs/benchmark,runs/benchmark_seed1]
    python -m lightning_app <subcommand> --help | --print_config
"""
from __future__ import annotations

import inspect
import logging
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")  # no network here; `wandb sync` later
os.environ.setdefault("WANDB_SILENT", "true")  # one line from us, not wandb's banner per run
warnings.filterwarnings("ignore", message=r".*(LeafSpec|does not have many workers|predict_dataloader|"
                                          r"`training_step` returns `None`|deterministic|"
                                          r"Checkpoint directory .* exists and is not empty).*")  # we resume there

from jsonargparse import ActionConfigFile, ArgumentParser  # noqa: E402
from pytorch_lightning.cli import LightningCLI  # noqa: E402

from callbacks.checkpoint import checkpoint_dir  # noqa: E402
from datamodules.datamodule import InteractiveDataModule  # noqa: E402
from lightning_app.app import serve_app  # noqa: E402
from lightning_app.app_benchmark import app_benchmark, export_images  # noqa: E402
from lightning_app.benchmark import run_benchmark  # noqa: E402
from lightning_app.evolve import run_evolution  # noqa: E402
from lightning_app.importance import compute_importance  # noqa: E402
from lightning_app.report import run_spread  # noqa: E402
from modules.environment import cpu_has_bf16, cpu_model  # noqa: E402
from modules.errors import UserError  # noqa: E402
from modules.interactive import InteractiveSegmentationModule  # noqa: E402


# quiet output: Lightning's device lines and product tips would repeat for every benchmark run
# (after the imports: importing Lightning sets its loggers to INFO)
for _name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)

FUNCTIONS = {"benchmark": run_benchmark, "importance": compute_importance, "evolve": run_evolution, "app": serve_app,
             "app-benchmark": app_benchmark, "images": export_images, "spread": run_spread}
"""Subcommands that are plain functions (of options, and of ``data`` when they take it)."""


def function_parser(name: str) -> ArgumentParser:
    fn = FUNCTIONS[name]
    parser = ArgumentParser(prog=f"python -m lightning_app {name}", description=fn.__doc__.split("\n")[0],
                            allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (see configs/)")
    data = inspect.signature(fn).parameters.get("data")
    takes_module = data is not None and data.annotation in (InteractiveDataModule, "InteractiveDataModule")
    parser.add_function_arguments(fn, skip={"data"} if takes_module else set())  # else ``data`` is one entry
    if takes_module:
        parser.add_class_arguments(InteractiveDataModule, "data")
    return parser


def function_main(name: str, argv: list[str]):
    parser = function_parser(name)
    init = parser.instantiate_classes(parser.parse_args(argv))
    return FUNCTIONS[name](**{k: v for k, v in init.items() if k != "config"})


def resolve_checkpoint(ckpt_path: str | None, checkpoint_dir: str | None) -> tuple[str, int] | None:
    """What ``fit --ckpt_path`` resumes from, with its global step. ``last``:
    ``<checkpoint_dir>/last.ckpt`` when it loads, else the newest ``step*.ckpt`` that loads (a
    kill while ``last.ckpt`` was first written), else nothing (a fresh start); partial ``.tmp``
    files of killed writes are removed. A given path must exist and load."""
    import torch

    def step(path: Path) -> int | None:
        """The checkpoint's global step, ``None`` when it does not load as a Lightning checkpoint."""
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 (anything unreadable is no checkpoint)
            return None
        return int(ckpt.get("global_step", 0)) if "state_dict" in ckpt else None

    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        path = Path(ckpt_path)
        if not path.is_file():
            raise UserError(f"--ckpt_path '{ckpt_path}' does not exist (or use 'last' to resume a run when there is one)")
        if (at := step(path)) is None:
            raise UserError(f"--ckpt_path '{ckpt_path}' is not a readable Lightning checkpoint")
        return str(path), at
    folder = Path(checkpoint_dir) if checkpoint_dir else None
    if folder is None or not folder.is_dir():
        return None
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    candidates = [folder / "last.ckpt"] + sorted(folder.glob("step*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        if path.is_file() and (at := step(path)) is not None:
            if path.name != "last.ckpt":
                print(f"{folder / 'last.ckpt'} is missing or unreadable: resuming from {path}", file=sys.stderr)
            return str(path), at
    return None


class CLI(LightningCLI):
    """LightningCLI for fit / validate / test; ``fit --ckpt_path last`` resumes robustly."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}  # the model has no predict step

    def _parse_ckpt_path(self) -> None:
        # Lightning would read model hyperparameters out of a given --ckpt_path (and fail on a
        # corrupt one with a traceback); here the config is the source of truth: only check it.
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and ckpt_path != "last":
            resolve_checkpoint(ckpt_path, None)

    def before_instantiate_classes(self) -> None:
        """``trainer.precision: bf16-mixed`` (``configs/train_init.yaml``, ``configs/train_bsds.yaml``) on a
        CPU without bfloat16 kernels trains in 32-bit instead, and says so: there bfloat16 would be
        slower, not faster."""
        import torch

        sub = self.config.get("subcommand")
        trainer = self.config[sub].trainer if sub else None
        if trainer is None or not str(trainer.precision).startswith("bf16"):
            return
        on_cpu = trainer.accelerator == "cpu" or (trainer.accelerator == "auto" and not torch.cuda.is_available())
        if not on_cpu or cpu_has_bf16():
            return
        print(f"trainer.precision={trainer.precision}: this CPU ({cpu_model()}) has no bfloat16 kernels, "
              "where bfloat16 is slower than 32-bit: training in 32-bit", file=sys.stderr)
        trainer.precision = "32-true"

    def before_fit(self) -> None:
        callback = self.trainer.checkpoint_callback
        folder = None if callback is None else (callback.dirpath or checkpoint_dir(self.trainer))
        config = self.config_init["fit"]
        config["ckpt_path"], self.resumed_step = resolve_checkpoint(config.get("ckpt_path"), folder) or (None, 0)

    def fit(self, model, ckpt_path: str | None = None, **kwargs) -> None:
        """``trainer.fit``, unless the checkpoint resumed from is already at ``max_steps``: a
        finished run run again (``make demo`` twice) then leaves its checkpoint, and with it the
        digest its MAS importance and benchmark results are keyed by, untouched."""
        if ckpt_path and 0 < self.trainer.max_steps <= self.resumed_step:
            print(f"{ckpt_path} is trained to step {self.resumed_step} of {self.trainer.max_steps}: nothing to do", flush=True)
            return
        self.trainer.fit(model, ckpt_path=ckpt_path, **kwargs)


BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "base.yaml"
"""What every training run shares (``fit`` reads it before the run's ``--config``)."""


def lightning_main(argv: list[str]) -> None:
    CLI(
        InteractiveSegmentationModule,
        InteractiveDataModule,
        args=None if argv == sys.argv[1:] else argv,  # LightningCLI warns when given both
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"allow_abbrev": False, "fit": {"default_config_files": [str(BASE_CONFIG)], "allow_abbrev": False}},
    )


USAGE = """usage: python -m lightning_app <command> [options]   (<command> --help for its options)

  fit         train a model (LightningCLI: --config configs/train_init.yaml)
  validate    validate a checkpoint
  test        Lightning's test loop on a checkpoint
  benchmark   click-by-click benchmark of test-time adaptation variants
  importance  MAS importance of a checkpoint (for adaptation with gamma > 0)
  evolve      life-long evolution through a sequence of datasets (paper B)
  app         the annotation app (a local web page)
  app-benchmark  the app's click -> mask latency per adaptation mode
  images      write a dataset's images as PNG files (e.g. to annotate in the app)
  spread      NoC and mIoU@k of one benchmark across models trained with different seeds
"""


def main(argv: list[str] | None = None) -> int:
    from lightning_fabric.utilities.exceptions import MisconfigurationException
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] not in FUNCTIONS and argv[0] not in CLI.subcommands():
        print(f"{USAGE}\nerror: unknown command '{argv[0]}' (the commands are listed above)", file=sys.stderr)
        return 2
    try:
        if argv[0] in FUNCTIONS:
            function_main(argv[0], argv[1:])
        else:
            lightning_main(argv)
    except SIGTERMException:
        print("terminated (SIGTERM) before the end: rerun the same command to resume", file=sys.stderr)
        return 143
    except (UserError, MisconfigurationException) as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 2
    return 0


def error_line(e: Exception) -> str:
    """The error's message on one line; for an error re-raised from a DataLoader worker (whose
    message carries the worker's traceback), the original message alone."""
    text = str(e)
    if "Original Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())
