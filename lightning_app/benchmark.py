"""``benchmark``: evaluate a checkpoint click by click on every benchmark dataset, for every
test-time adaptation variant.

Resumable: each (dataset, variant) is written to ``results.json`` as soon as it finishes (with its
per-object IoUs, from which every other output is derived), and a rerun with the same checkpoint,
data and protocol skips what is already there. One run at a time per folder (a lock file).
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader

from callbacks.adaptation import same_settings, variant_callback, variant_spec
from callbacks.benchmark import ClickRecorder, ObjectRecord
from datamodules.datamodule import InteractiveDataModule
from datamodules.registry import entry_identity
from lightning_app import report
from lightning_app.checkpoints import file_digest, load_module
from lightning_app.importance import load_importance
from modules.environment import environment
from modules.errors import UserError
from modules.interactive import EvaluationProtocol
from modules.metrics import sequence_drift, summarize, threshold_key
from modules.simulate import CLICKER

ADAPT_DIR = Path(__file__).resolve().parents[1] / "configs" / "adapt"
Variant = str | dict[str, Any]


def variant_name(variant: Variant) -> str:
    return variant if isinstance(variant, str) else str(variant.get("name", ""))


@contextmanager
def locked(out: Path):
    """Hold ``out/.lock`` for the run: a second benchmark on the same folder stops with an error
    instead of overwriting this one's results. Also checks that ``out`` is writable."""
    import fcntl

    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / ".lock", "a+")
    except OSError as e:
        raise UserError(f"out_dir '{out}' is not writable: {e.strerror}") from e
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"out_dir '{out}' is in use by another benchmark; wait for it or choose another --out_dir") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def run_benchmark(
    ckpt: str,
    data: InteractiveDataModule,
    out_dir: str = "runs/benchmark",
    variants: list[Variant] = ["fixed"],  # noqa: B006
    max_clicks: int = 20,
    iou_thresholds: list[float] = [0.8, 0.85, 0.9],  # noqa: B006
    target_iou: float = 0.9,
    paper_thresholds: dict[str, float] = {},  # noqa: B006
    fresh: bool = False,
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
        data: the datamodule whose ``test`` entries are the benchmark datasets.
        out_dir: folder for results.json, results.md, per_object_iou.csv, the plots, wandb.
        variants: adaptation variants, in order: names of ``<adapt_dir>/<name>.yaml`` or inline
            ``{name: ..., image: {...}, sequence: {...}}``.
        max_clicks: clicks per object (NoC is capped here).
        iou_thresholds: IoU targets for NoC and failures.
        target_iou: where Algorithm 1's simulated user stops an object: sequence adaptation
            learns from the clicks made until then (every object is still played to
            ``max_clicks`` for the report).
        paper_thresholds: per dataset name, the threshold its paper reports it at (shown first).
        fresh: when ``out_dir`` holds results of another checkpoint, protocol or data, move them
            aside into ``out_dir/superseded-<time>/`` (otherwise that is an error).
        accelerator: Lightning accelerator (cpu, gpu, auto).
        devices: devices (processes) to evaluate on; each adapts on its own share of the
            objects (``ddp``; gloo on CPU).
        strategy: Lightning strategy (``auto``, ``ddp``).
        wandb_project: wandb project (offline unless WANDB_MODE says otherwise).
        wandb_group: wandb group of this benchmark's runs (default: the folder's name).
        adapt_dir: folder of the variants' configs.
    """
    names = [variant_name(v) for v in variants]
    specs = {name: variant_spec(v, adapt_dir) for name, v in zip(names, variants)}  # fails on a bad variant before any work
    if len(set(names)) != len(names):
        raise UserError(f"variants: names {names} repeat")
    if not 1 <= max_clicks <= 100:
        raise UserError(f"max_clicks={max_clicks}: expected 1..100")
    if not iou_thresholds or any(not 0 < t < 1 for t in iou_thresholds):
        raise UserError(f"iou_thresholds={iou_thresholds}: expected values in (0, 1)")
    if not 0 < target_iou <= 1:
        raise UserError(f"target_iou={target_iou}: expected a value in (0, 1]")
    out = Path(out_dir)
    digest = file_digest(ckpt) if Path(ckpt).is_file() else None
    importance = load_importance(ckpt, digest) if digest else None  # before the model: a stale file stops here
    module = load_module(ckpt)
    protocol = {"max_clicks": max_clicks, "iou_thresholds": list(iou_thresholds), "target_iou": target_iou,
                "paper_thresholds": dict(paper_thresholds), "clicker": CLICKER}
    model = {"checkpoint": str(ckpt), "sha256_16": digest, "hparams": dict(module.hparams)}
    data_config = dict(data.hparams)
    datasets = data.test_datasets()
    identities = {ds.name: dataset_identity(e, data.hparams.min_area) for ds, e in zip(datasets, data.hparams.test)}
    group = wandb_group or out.resolve().name
    main = rank_zero_only.rank == 0
    with locked(out) if main else _nothing():
        results = report.read_results(out) if main else None
        if results and (results.get("protocol"), results.get("model", {}).get("sha256_16")) != (protocol, digest):
            if not fresh:
                raise UserError(f"{out / report.RESULTS} holds results of another checkpoint or protocol: "
                                "choose another --out_dir, or --fresh true to move them aside")
            aside = out / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
            aside.mkdir()
            for p in out.iterdir():
                if p.name != ".lock" and not p.name.startswith("superseded-"):
                    p.rename(aside / p.name)
            print(f"earlier results moved to {aside}")
            results = None
        results = results or {"protocol": protocol, "model": model, "data": data_config, "results": {}, "objects": {}}
        if main:  # both run: each drops what changed and records what is now
            changed = forget_changed_datasets(results, identities)
            if forget_changed_variants(results, specs) or changed:
                results["data"] = data_config
                report.write_results(out, results)
        for variant, name in zip(variants, names):
            todo = [ds for ds in datasets if name not in results["results"].get(ds.name, {})]
            if not todo:
                print(f"{name}: every dataset already in {out / report.RESULTS}, skipped")
                continue
            for ds in todo:  # each dataset is its own sequence, starting from the checkpoint's weights
                start = time.perf_counter()
                records, rollbacks = _evaluate(ckpt, importance, ds, variant, name, adapt_dir, max_clicks, target_iou,
                                               accelerator, devices, strategy, data.hparams.num_workers)
                if records is None:  # not the main process
                    continue
                entry = _entry(records, rollbacks, iou_thresholds, max_clicks)
                results["results"].setdefault(ds.name, {})[name] = entry
                results["objects"].setdefault(ds.name, {})[name] = {"names": [r.name for r in records],
                                                                    "ious": [[round(float(v), 5) for v in r.ious] for r in records]}
                report.write_results(out, results)
                t = report.headline_threshold(protocol, ds.name)
                print(f"{name} · {ds.name}: {entry['n_objects']} objects, NoC@{t} {entry['noc'][t]:.2f} "
                      f"[{entry['noc_ci95'][t][0]:.2f}, {entry['noc_ci95'][t][1]:.2f}], "
                      f"{1000 * entry['seconds_per_click']:.1f} ms/click ({time.perf_counter() - start:.0f} s)", flush=True)
                if main:
                    _log_to_wandb(wandb_project, group, out, name, ds, records, entry, max_clicks)
        if main:
            if _in_order(results, names):  # the config's order, once every variant has run or was kept
                report.write_results(out, results)
            _log_comparison(wandb_project, group, out, results)
            files = report.write_reports(out, results)
            report.print_table(results)
            print(f"results: {out / report.RESULTS}  also: {', '.join(str(f) for f in files)}")
    return results


def dataset_identity(entry, min_area: int | None) -> dict:
    """What decides a dataset's objects: its entry with its defaults written out, and min_area."""
    return {"entry": entry_identity(entry), "min_area": min_area}


def forget_changed_datasets(results: dict, identities: dict[str, dict]) -> bool:
    """Drop the results of every dataset whose recorded identity differs from ``identities``
    (one line each: every variant runs on it again) and record ``identities``. Results written
    before identities were recorded are checked against the data config they recorded, as
    written (a synthetic domain's style was then its renderer's defaults of that day).
    Returns whether ``results`` changed."""
    if "datasets" not in results:
        old = results.get("data") or {}
        results["datasets"] = {e.get("name") or e.get("domain") or e["dataset"]: {"entry": e, "min_area": old.get("min_area")}
                               for e in ({"dataset": e} if isinstance(e, str) else e for e in old.get("test", []))}
    recorded, changed = results["datasets"], False
    for name, identity in identities.items():
        if name in recorded and recorded[name] != identity and any(name in t for t in (results["results"], results["objects"])):
            print(f"{name}: its data changed since it ran (now {identity['entry']}), running every variant on it again")
            for table in (results["results"], results["objects"]):
                table.pop(name, None)
        changed = changed or recorded.get(name) != identity
        recorded[name] = identity
    return changed


def forget_changed_variants(results: dict, specs: dict[str, dict]) -> bool:
    """Drop the results of every variant whose recorded settings differ from ``specs`` (one line
    each: it runs again) and record ``specs``. A resumed benchmark then skips only the variants
    that would run exactly as before; results written before settings were recorded are kept.
    Returns whether ``results`` changed."""
    if "variants" not in results and results["results"]:
        print("these results were written before variant settings were recorded: kept as they are "
              "(another --out_dir runs every variant again)")
    recorded, changed = results.setdefault("variants", {}), False
    for name, spec in specs.items():
        if name in recorded and not same_settings(recorded[name], spec):
            print(f"{name}: its settings changed since it ran, running it again")
            for table in (results["results"], results["objects"]):
                for per_dataset in table.values():
                    per_dataset.pop(name, None)
        changed = changed or recorded.get(name) != spec
        recorded[name] = spec  # a setting added since is written down
    return changed


def _in_order(results: dict, names: list[str]) -> bool:
    """Each dataset's variants that ``names`` lists, in its order, in the places they hold; the
    others stay where they are (a variant run alone keeps its row; a new one comes last).
    Returns whether any order changed."""
    changed = False
    for key in ("results", "objects"):
        for ds, variants in results[key].items():
            named = iter(sorted((v for v in variants if v in names), key=names.index))
            order = [next(named) if v in names else v for v in variants]
            changed = changed or order != list(variants)
            results[key][ds] = {v: variants[v] for v in order}
    return changed


@contextmanager
def _nothing():
    yield


def _entry(records: list[ObjectRecord], rollbacks: int, thresholds: list[float], max_clicks: int) -> dict:
    ious = np.stack([r.ious for r in records])
    seconds = np.concatenate([r.seconds for r in records])
    entry = summarize(ious, thresholds, max_clicks)
    entry.update({
        "seconds_per_click": float(np.mean(seconds)),
        "seconds_per_click_p50": float(np.percentile(seconds, 50)),
        "seconds_per_click_p95": float(np.percentile(seconds, 95)),
        "repeated_click_fraction": float(sum(r.repeats for r in records) / max(1, sum(r.clicks for r in records))),
        "repeated_user_click_fraction": float(sum(r.user_repeats for r in records) / max(1, sum(r.user_clicks for r in records))),
        "user_clicks_mean": float(np.mean([r.user_clicks for r in records])),
        "adaptation_rollbacks": int(rollbacks),
        "iou_at_k_first_last": sequence_drift(ious, click=min(4, max_clicks)),
        "cpu_threads": torch.get_num_threads(),  # adaptation's weights depend on it (README, Reproducibility)
        "environment": environment(),  # the CPU and library versions too
    })
    return entry


def _evaluate(ckpt, importance, dataset, variant, name, adapt_dir, max_clicks, target_iou, accelerator, devices, strategy,
              num_workers) -> tuple[list[ObjectRecord] | None, int]:
    """One variant on one dataset: the object records (``None`` off rank 0) and the number of
    adaptation steps rolled back."""
    module = load_module(ckpt)
    module.protocol = EvaluationProtocol(max_clicks=max_clicks, target_iou=target_iou)
    module.mas_importance = importance
    recorder = ClickRecorder(label=name)
    adaptation = variant_callback(variant, adapt_dir)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, logger=False,
        callbacks=[recorder, adaptation],
        inference_mode=False,  # test-time adaptation needs gradients; predictions use no_grad
        enable_model_summary=False, enable_progress_bar=False,
    )
    trainer.test(module, dataloaders=DataLoader(dataset, batch_size=1, num_workers=num_workers), verbose=False)
    if not trainer.is_global_zero:
        return None, 0
    return recorder.dataset(dataset.name), (adaptation.adapter.rollbacks if adaptation.adapter else 0)


def wandb_run(project: str, group: str, out: Path, name: str, job_type: str = "benchmark"):
    """A wandb run in ``group`` writing under ``out`` (offline unless WANDB_MODE says otherwise)."""
    import wandb

    # the mode as WANDB_MODE says now: wandb keeps the first run's settings for the process otherwise
    return wandb.init(project=project, name=name, group=group, dir=str(out), job_type=job_type,
                      mode=os.environ.get("WANDB_MODE", "offline"), reinit="finish_previous",
                      settings=wandb.Settings(silent=True))


def _overlay(image: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image with the prediction (green where right, red where wrong) and the truth's outline."""
    out = image.astype(np.float32).copy()
    right, wrong = mask & gt, mask ^ gt
    out[right] = 0.5 * out[right] + [0, 127, 0]
    out[wrong] = 0.5 * out[wrong] + [127, 0, 0]
    edge = gt ^ np.pad(gt, 1, mode="edge")[1:-1, 2:] | gt ^ np.pad(gt, 1, mode="edge")[2:, 1:-1]
    out[edge] = [255, 255, 0]
    return out.clip(0, 255).astype(np.uint8)


def _log_to_wandb(project: str, group: str, out: Path, variant: str, dataset, records: list[ObjectRecord], entry: dict,
                  max_clicks: int, worst: int = 3) -> None:
    """One run per (variant, dataset) in the benchmark's group: mIoU after every click, the
    sequence curve (IoU@4 per image), NoC/failures/latency as summary metrics, and the worst
    objects' first and last masks."""
    import wandb

    run = wandb_run(project, group, out, f"{variant}/{dataset.name}")
    run.config.update({"variant": variant, "dataset": dataset.name})
    run.define_metric("click")
    run.define_metric("miou", step_metric="click")
    run.define_metric("image")
    run.define_metric("iou_at_4", step_metric="image")
    for k, v in enumerate(entry["miou_at_click"], start=1):
        run.log({"click": k, "miou": v})
    for i, r in enumerate(records, start=1):
        run.log({"image": i, "iou_at_4": float(r.ious[min(4, max_clicks) - 1])})
    summary = {f"noc@{t}": v for t, v in entry["noc"].items()} | {f"failures@{t}": v for t, v in entry["failures"].items()}
    summary |= {k: entry[k] for k in ("seconds_per_click", "seconds_per_click_p95", "repeated_click_fraction",
                                      "repeated_user_click_fraction", "adaptation_rollbacks", "n_objects")}
    run.summary.update(summary)
    order = np.argsort([r.ious[-1] for r in records])[:worst]
    pairs = {}  # one key per object: photos differ in size, and wandb wants one size per key
    for rank, i in enumerate(order, start=1):
        sample = dataset.source.get_sample(int(i))
        first, last = records[i].masks()
        pairs[f"worst_objects/{rank}"] = [
            wandb.Image(_overlay(sample.image, sample.mask, first), caption=f"{records[i].name} click 1 IoU {records[i].ious[0]:.2f}"),
            wandb.Image(_overlay(sample.image, sample.mask, last),
                        caption=f"{records[i].name} click {max_clicks} IoU {records[i].ious[-1]:.2f}")]
    run.log(pairs)
    run.finish()


def _log_comparison(project: str, group: str, out: Path, results: dict) -> None:
    """The group's comparison run: mIoU against clicks of every variant, one line plot per
    dataset keyed by variant, and the NoC table."""
    import wandb

    if not results["results"]:
        return
    run = wandb_run(project, group, out, "comparison")
    for ds, variants in results["results"].items():
        table = wandb.Table(columns=["variant", "click", "miou"],
                            data=[[v, k, m] for v, r in variants.items() for k, m in enumerate(r["miou_at_click"], start=1)])
        run.log({f"{ds}/miou_vs_clicks": wandb.plot.line(table, "click", "miou", stroke="variant",
                                                         title=f"{ds}: mIoU against clicks")})
    thresholds = [threshold_key(t) for t in results["protocol"]["iou_thresholds"]]
    rows = [[ds, v] + [r["noc"][t] for t in thresholds] + [r["seconds_per_click"]]
            for ds, variants in results["results"].items() for v, r in variants.items()]
    run.log({"noc": wandb.Table(columns=["dataset", "variant"] + [f"noc@{t}" for t in thresholds] + ["seconds_per_click"],
                                data=rows)})
    run.finish()
    print(f"wandb ({os.environ.get('WANDB_MODE', 'online')}): group '{group}' in {out / 'wandb'}", file=sys.stderr)
