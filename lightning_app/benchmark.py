"""``benchmark``: evaluate a checkpoint click by click on every benchmark dataset.

Resumable: each (dataset, variant) is written to ``results.json`` as soon as it finishes, and a
rerun with the same checkpoint, data and protocol skips what is already there.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from lightning_fabric.utilities.rank_zero import rank_zero_only
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.loggers import WandbLogger
from torch.utils.data import DataLoader

from jsonargparse import ArgumentParser

from callbacks.benchmark import ClickRecorder
from datamodules.datamodule import InteractiveDataModule
from lightning_app import report
from lightning_app.checkpoints import file_digest, load_module
from lightning_app.importance import load_importance
from modules.errors import UserError
from modules.metrics import sequence_drift, summarize

ADAPT_DIR = Path(__file__).resolve().parents[1] / "configs" / "adapt"


def variant_callbacks(name: str, adapt_dir: str | Path = ADAPT_DIR) -> list[pl.Callback]:
    """Fresh callbacks of adaptation variant ``name``, from ``<adapt_dir>/<name>.yaml``."""
    path = Path(adapt_dir) / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(adapt_dir).glob("*.yaml"))
        raise UserError(f"unknown variant(s) ['{name}']: no {path} (expected some of {known})")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callbacks", type=list[pl.Callback], default=[])
    try:
        return parser.instantiate_classes(parser.parse_path(path)).callbacks
    except Exception as e:  # noqa: BLE001 (jsonargparse raises several kinds for a bad file)
        raise UserError(f"variant config '{path}': {' '.join(str(e).split())[:300]}") from e


def run_benchmark(
    ckpt: str,
    data: InteractiveDataModule,
    out_dir: str = "runs/benchmark",
    variants: list[str] = ["fixed"],  # noqa: B006
    max_clicks: int = 20,
    iou_thresholds: list[float] = [0.8, 0.85, 0.9],  # noqa: B006
    accelerator: str = "auto",
    devices: int = 1,
    strategy: str = "auto",
    wandb_project: str = "interactive-segmentation",
    wandb_group: str | None = None,
    adapt_dir: str = str(ADAPT_DIR),
) -> dict:
    """Benchmark ``ckpt`` on ``data``'s test sets and write the results under ``out_dir``.

    Args:
        ckpt: checkpoint of an InteractiveSegmentationModule.
        data: the datamodule whose ``test_dataloader`` lists the benchmark datasets.
        out_dir: folder for results.json, per_object_iou.csv, miou_vs_clicks.png, wandb.
        variants: adaptation variants to run, in order.
        max_clicks: clicks per object (NoC is capped here).
        iou_thresholds: IoU targets for NoC and failures.
        accelerator: Lightning accelerator (cpu, gpu, auto).
        devices: devices (processes) to evaluate on; each adapts on its own share of the
            objects (``ddp``; gloo on CPU).
        strategy: Lightning strategy (``auto``, ``ddp``).
        wandb_project: wandb project (offline unless WANDB_MODE says otherwise).
        wandb_group: wandb group of this benchmark's runs (default: the folder's name).
        adapt_dir: folder of the variants' callback configs (``<variant>.yaml``).
    """
    for v in variants:  # fail on a bad variant before any work
        variant_callbacks(v, adapt_dir)
    if not 1 <= max_clicks <= 100:
        raise UserError(f"max_clicks={max_clicks}: expected 1..100")
    if not iou_thresholds or any(not 0 < t < 1 for t in iou_thresholds):
        raise UserError(f"iou_thresholds={iou_thresholds}: expected values in (0, 1)")
    out = Path(out_dir)
    module = load_module(ckpt)
    digest = file_digest(ckpt)
    importance = load_importance(ckpt, digest)
    protocol = {"max_clicks": max_clicks, "iou_thresholds": list(iou_thresholds)}
    model = {"checkpoint": str(ckpt), "sha256_16": digest, "hparams": dict(module.hparams)}
    data_config = dict(data.hparams)

    results = report.read_results(out)
    rows = report.read_rows(out)
    same = results and (results.get("protocol"), results.get("model", {}).get("sha256_16"), results.get("data")) == (
        protocol, model["sha256_16"], data_config)
    if not same:
        if results:
            print(f"{out / report.RESULTS} holds results of another checkpoint, protocol or data: starting afresh")
        results, rows = {"protocol": protocol, "model": model, "data": data_config, "results": {}}, []

    datasets = data.test_datasets()
    group = wandb_group or out.resolve().name
    for variant in variants:
        todo = [ds for ds in datasets if variant not in results["results"].get(ds.name, {})]
        if not todo:
            print(f"{variant}: every dataset already in {out / report.RESULTS}, skipped")
            continue
        logger = WandbLogger(project=wandb_project, name=variant, group=group, save_dir=str(out), job_type="benchmark")
        for ds in todo:  # each dataset is its own sequence, starting from the checkpoint's weights
            names, ious, seconds = _evaluate(ckpt, importance, ds, variant, adapt_dir, max_clicks, logger,
                                             accelerator, devices, strategy, data.hparams.num_workers)
            if names is None:  # not the main process
                continue
            entry = summarize(ious, iou_thresholds, max_clicks)
            entry["seconds_per_click"] = float(np.mean(seconds))
            entry["iou_at_k_first_last"] = sequence_drift(ious, click=min(4, max_clicks))
            results["results"].setdefault(ds.name, {})[variant] = entry
            rows += report.object_rows(ds.name, variant, names, ious)
            report.write_rows(out, rows, max_clicks)
            report.write_results(out, results)
        if rank_zero_only.rank == 0:
            _log_to_wandb(logger, results, variant, [ds.name for ds in todo])
            logger.experiment.finish()

    if rank_zero_only.rank == 0:
        plots = [report.plot_miou(out, results), report.plot_sequence(out, rows, click=min(4, max_clicks))]
        report.print_table(results)
        print(f"results: {out / report.RESULTS}  per-object IoU: {out / report.PER_OBJECT}  plots: {', '.join(map(str, plots))}")
    return results


def _evaluate(ckpt, importance, dataset, variant, adapt_dir, max_clicks, logger, accelerator, devices, strategy, num_workers):
    """One variant on one dataset: (object names, IoUs, per-click seconds), or Nones off rank 0."""
    module = load_module(ckpt)
    module.hparams.eval_max_clicks = max_clicks
    module.mas_importance = importance
    recorder = ClickRecorder()
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        logger=logger,
        callbacks=[RichProgressBar(), recorder, *variant_callbacks(variant, adapt_dir)],
        inference_mode=False,  # test-time adaptation needs gradients; predictions use no_grad
        enable_model_summary=False,
    )
    trainer.test(module, dataloaders=DataLoader(dataset, batch_size=1, num_workers=num_workers), verbose=False)
    if not trainer.is_global_zero:
        return None, None, None
    return recorder.dataset(dataset.name)


def _log_to_wandb(logger: WandbLogger, results: dict, variant: str, datasets: list[str]) -> None:
    entries = {ds: results["results"][ds][variant] for ds in datasets}
    max_clicks = results["protocol"]["max_clicks"]
    for k in range(max_clicks):
        logger.log_metrics({f"{ds}/miou_at_click": e["miou_at_click"][k] for ds, e in entries.items()}, step=k + 1)
    summary = {}
    for ds, e in entries.items():
        summary.update({f"{ds}/noc@{t}": v for t, v in e["noc"].items()})
        summary.update({f"{ds}/failures@{t}": v for t, v in e["failures"].items()})
        summary[f"{ds}/seconds_per_click"] = e["seconds_per_click"]
    logger.experiment.summary.update(summary)
