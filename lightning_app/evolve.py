"""``evolve``: paper B's life-long evolution over a sequence of datasets (sec. 3.4).

For each stage, in order, from the initial model (trained with masks, ``configs/evolve/init.yaml``):

1. the simulated users click three times on every object of the stage's dataset
   (``interactions.json``; the only read of its masks, ``datamodules.evolution``);
2. the stage's starting model predicts coarse pseudo masks from those clicks, IPT refines them,
   the classifier judges each object's class (``pseudo.npz``); how good the masks are is
   measured against the ground truth for the report only (``pseudo_quality.json``);
3. the model trains from the previous stage's weights on pairs of a new object and an object of
   all earlier data (the initial dataset with its masks, earlier stages with their pseudo
   masks), Eq. 11; checkpoints every epoch, so a killed stage resumes where it stopped;
4. the evolved model (``model.ckpt``, a plain model checkpoint: its presence marks the stage
   complete) is benchmarked on every dataset seen so far.

``results.json`` holds the stage-by-dataset table (3-click mIoU, NoC@85/90 with corrective
clicks after the three), mirrored in ``table.csv``, ``table.png`` and wandb.
"""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
from pytorch_lightning.loggers import WandbLogger
from rich.progress import track
from torch.utils.data import DataLoader

from datamodules.datamodule import InteractiveDataModule
from datamodules.evolution import (MaskFree, PairedObjects, PseudoLabelled, load_pseudo_masks, record_interactions,
                                   save_pseudo_masks)
from datamodules.objects import ObjectSource, TrainObjects, image_to_tensor
from datamodules.registry import Concat, build_source
from lightning_app import report
from lightning_app.benchmark import run_benchmark
from lightning_app.checkpoints import load_module
from modules.clicks import Click
from modules.errors import UserError
from modules.evolution import known_class
from modules.evolution_module import EvolutionModule
from modules.interactive import InteractiveSegmentationModule
from modules.io import AtomicCheckpointIO, atomic_write, atomic_write_text
from modules.ipt import refine_pseudo_mask
from modules.metrics import iou

Entry = dict[str, Any]


@torch.no_grad()
def pseudo_label(model: InteractiveSegmentationModule, images: MaskFree, interactions: list[list[Click]],
                 known_classes: int, known_threshold: float = 0.5, ipt: dict | None = None,
                 seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """Coarse and IPT-refined pseudo masks (original resolution) and the classifier's verdict
    (class id or -1) for every object, from its image and the users' clicks alone. IPT (with
    ``ipt``'s overrides of :func:`refine_pseudo_mask`'s parameters) runs at the network's
    resolution on the L2-normalised decoder features."""
    model.eval()
    coarse_masks, refined_masks, verdicts = [], [], []
    for i in track(range(len(images)), description=f"pseudo masks {images.name}"):
        image = image_to_tensor(images.get_image(i))[None].to(model.device)
        session = model.session(image)
        clicks = session.net_clicks(interactions[i])
        out = model.outputs(session.net_image, clicks)
        net_hw = session.net_hw
        up = lambda t: F.interpolate(t, size=net_hw, mode="bilinear", align_corners=False)  # noqa: E731
        coarse = (out["logits"] > 0)[0, 0].cpu().numpy()
        refined = coarse
        if coarse.any():
            positive = next(c for c in clicks[0].tolist() if c[2] > 0)
            click = (min(max(round(positive[0]), 0), net_hw[0] - 1), min(max(round(positive[1]), 0), net_hw[1] - 1))
            refined = refine_pseudo_mask(F.normalize(up(out["features"]), dim=1)[0].cpu(), coarse,
                                         torch.sigmoid(up(out["binary"]))[0, 0].cpu().numpy(), click,
                                         np.random.default_rng([seed, i]), **(ipt or {}))["mask"]
        back = lambda m: _resize_mask(m, session.hw)  # noqa: E731
        coarse_masks.append(back(coarse))
        refined_masks.append(back(refined))
        verdicts.append(int(known_class(out["classes"], known_classes, known_threshold)[0]))
    return coarse_masks, refined_masks, verdicts


def _resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if mask.shape == tuple(hw):
        return mask
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.interpolate(t, size=hw, mode="bilinear", align_corners=False)[0, 0] > 0.5).numpy()


def pseudo_mask_quality(source: ObjectSource, coarse: list[np.ndarray], refined: list[np.ndarray]) -> dict:
    """mIoU of the pseudo masks before and after IPT against the ground truth (paper B's
    Table 3). A measurement for the report; nothing trains on it."""
    before, after = [], []
    for i in range(len(source)):
        s = source.get_sample(i)
        before.append(iou(coarse[i], s.mask, s.ignore) if (coarse[i].any() or s.mask.any()) else 1.0)
        after.append(iou(refined[i], s.mask, s.ignore) if (refined[i].any() or s.mask.any()) else 1.0)
    return {"coarse_miou": float(np.mean(before)), "ipt_miou": float(np.mean(after)), "n_objects": len(source),
            "empty_coarse": int(sum(not m.any() for m in coarse))}


def _classes(source: ObjectSource) -> list[int]:
    """Class ids of the objects of a replay source (-1 where it has none)."""
    if not hasattr(source, "class_of"):
        return [-1] * len(source)
    return [source.class_of(i) for i in track(range(len(source)), description=f"classes of {source.name}")]


def run_evolution(
    init_ckpt: str = "runs/evolve_init/checkpoints/last.ckpt",
    stages: list[str] = ["fundus", "rooftop"],  # noqa: B006
    catalog: dict[str, dict[str, Entry]] = {  # noqa: B006
        "fundus": {"train": {"dataset": "synthetic", "domain": "fundus", "length": 400, "seed": 5},
                   "test": {"dataset": "synthetic", "domain": "fundus", "length": 60, "seed": 2}},
        "rooftop": {"train": {"dataset": "synthetic", "domain": "rooftop", "length": 400, "seed": 5},
                    "test": {"dataset": "synthetic", "domain": "rooftop", "length": 60, "seed": 2}},
    },
    source_replay: Entry = {"dataset": "synthetic", "domain": "source", "length": 2000, "seed": 0},  # noqa: B006
    source_test: Entry = {"dataset": "synthetic", "domain": "source", "length": 60, "seed": 2},  # noqa: B006
    out_dir: str = "runs/evolve",
    ipt: bool = True,
    feature_alignment: bool = True,
    ipt_options: dict[str, float] = {},  # noqa: B006
    known_threshold: float = 0.5,
    epochs: int = 6,
    batch_size: int = 8,
    lr: float = 0.002,
    replay_final_weight: float = 0.1,
    crop_size: int = 128,
    train_max_side: int | None = None,
    num_workers: int = 1,
    min_area: int | None = None,
    max_clicks: int = 20,
    iou_thresholds: list[float] = [0.85, 0.9],  # noqa: B006
    measure_pseudo_masks: bool = True,
    seed: int = 0,
    accelerator: str = "auto",
    wandb_project: str = "interactive-segmentation",
) -> dict:
    """Evolve the initial model through ``stages`` with the users' clicks only (paper B).

    Args:
        init_ckpt: the initial model, trained with masks, three-click protocol and heads
            (``make evolve-init``).
        stages: names in ``catalog``, in the order the model meets them.
        catalog: per dataset name, its ``train`` entry (the images users click on; masks never
            trained on) and its ``test`` entry (benchmark); data-config entries as in ``data``.
        source_replay: the initial dataset with masks, replayed in every stage.
        source_test: the initial dataset's benchmark entry.
        out_dir: stage folders, results.json, table.csv, table.png, wandb.
        ipt: refine the pseudo masks with the IPT module (else train on the coarse masks).
        feature_alignment: feature-alignment and maximum-squares losses (else plain self-training).
        ipt_options: overrides of ``modules.ipt.refine_pseudo_mask``'s parameters (m, n, ...).
        known_threshold: the classifier's minimum probability for a known class.
        epochs: training epochs per stage over the new dataset's objects (checkpointed each).
        batch_size: pairs per step.
        lr: SGD learning rate of the stages.
        replay_final_weight: the earlier data's loss weight decays linearly to this.
        crop_size: training crop side.
        train_max_side: long side photos are brought to before cropping (``None``: as drawn).
        num_workers: dataloader workers.
        min_area: objects below this many pixels are skipped (``None``: the data config's default).
        max_clicks: clicks per object in the benchmark (the three count).
        iou_thresholds: NoC targets.
        measure_pseudo_masks: report pseudo-mask mIoU against the ground truth (Table 3).
        seed: seed of IPT's point sampling and of training.
        accelerator: Lightning accelerator.
        wandb_project: wandb project (offline unless WANDB_MODE says otherwise).
    """
    unknown = [s for s in stages if s not in catalog]
    if unknown:
        raise UserError(f"stages: unknown dataset(s) {unknown} (expected names from catalog: {sorted(catalog)})")
    if len(set(stages)) != len(stages) or not stages:
        raise UserError(f"stages={stages}: expected at least one, each once")
    for name in stages:
        missing = {"train", "test"} - set(catalog[name])
        if missing:
            raise UserError(f"catalog.{name}: missing key(s) {sorted(missing)}")
    init = load_module(init_ckpt)
    h = init.hparams
    if h.num_classes < 1 or h.click_protocol != "three_click":
        raise UserError(f"checkpoint '{init_ckpt}' is not an evolution initial model (needs click_protocol: three_click "
                        f"and num_classes >= 1; train one with `make evolve-init`)")
    known = h.num_classes
    out = Path(out_dir)
    method = {"ipt": ipt, "feature_alignment": feature_alignment, "ipt_options": ipt_options, "epochs": epochs,
              "lr": lr, "batch_size": batch_size, "replay_final_weight": replay_final_weight, "seed": seed}
    results = report.read_results(out) or {}
    if results and (results.get("init_ckpt"), results.get("method")) != (str(init_ckpt), method):
        raise UserError(f"{out / report.RESULTS} belongs to another initial model or method: use another --out_dir")
    results.update({"init_ckpt": str(init_ckpt), "method": method, "stages": list(stages)})
    results.setdefault("table", {})
    results.setdefault("pseudo_masks", {})
    results.setdefault("seconds", {})
    group = out.resolve().name
    tests = {"source": source_test} | {name: catalog[name]["test"] for name in stages}
    common = dict(num_workers=num_workers, min_area=min_area, max_clicks=max_clicks, iou_thresholds=iou_thresholds,
                  accelerator=accelerator, wandb_project=wandb_project, group=group)

    results["table"]["init"] = _evaluate(init_ckpt, tests, out / "init", **common)  # baseline on every dataset
    report.write_results(out, results)
    previous, replay_sources = str(init_ckpt), [build_source(source_replay, "source_replay", min_area)]
    source_classes: list[int] | None = None  # read once, when a stage first trains
    for t, name in enumerate(stages, start=1):
        stage_dir = out / f"stage{t}_{name}"
        start, worked = time.perf_counter(), False
        train_source = build_source(catalog[name]["train"], f"catalog.{name}.train", min_area)
        images = MaskFree(train_source)
        pseudo_path = stage_dir / "pseudo.npz"
        if not pseudo_path.is_file():
            interactions = record_interactions(train_source, stage_dir / "interactions.json")
            coarse, refined, verdicts = pseudo_label(load_module(previous), images, interactions, known, known_threshold,
                                                     dict(ipt_options), seed)  # both kept: Table 3 either way
            save_pseudo_masks(pseudo_path, coarse, refined, verdicts)
            worked = True
        coarse, refined, verdicts = load_pseudo_masks(pseudo_path)
        if measure_pseudo_masks and name not in results["pseudo_masks"]:
            results["pseudo_masks"][name] = pseudo_mask_quality(train_source, coarse, refined)
            report.write_results(out, results)
        masks = refined if ipt else coarse
        new = PseudoLabelled(images, masks)
        model_path = stage_dir / "model.ckpt"
        if not model_path.is_file():
            pl.seed_everything(seed + t, workers=True)
            module = EvolutionModule.from_previous(load_module(previous), known, feature_alignment=feature_alignment,
                                                   lr=lr, replay_final_weight=replay_final_weight)
            view = lambda s: TrainObjects(s, crop_size, max_positive=1, max_negative=0, click_capacity=3,  # noqa: E731
                                          max_side=train_max_side)  # the three clicks are placed in the step
            if source_classes is None:
                source_classes = _classes(replay_sources[0])
            earlier = Concat(replay_sources)  # earlier stages' objects have no class
            pairs = PairedObjects(view(new), [int(verdicts[i]) for i in new.keep], view(earlier),
                                  source_classes + [-1] * (len(earlier) - len(source_classes)))
            _train_stage(module, pairs, stage_dir, epochs, batch_size, num_workers, accelerator, wandb_project, group, name)
            module.export(model_path)
            worked = True
        if worked:  # a rerun that finds the stage done adds nothing to its time
            results["seconds"][name] = results["seconds"].get(name, 0.0) + time.perf_counter() - start
        seen = {k: v for k, v in tests.items() if k == "source" or k in stages[:t]}
        results["table"][f"+{name}"] = _evaluate(str(model_path), seen, stage_dir, **common)
        report.write_results(out, results)
        previous = str(model_path)
        replay_sources.append(PseudoLabelled(images, masks, name))

    write_table(out, results)
    _log_table(results, wandb_project, group)
    print_evolution(results)
    return results


def _train_stage(module: EvolutionModule, pairs: PairedObjects, stage_dir: Path, epochs: int, batch_size: int,
                 num_workers: int, accelerator: str, wandb_project: str, group: str, name: str) -> None:
    if len(pairs) < batch_size:
        raise UserError(f"stage '{name}': {len(pairs)} objects with a pseudo mask, fewer than batch_size={batch_size}")
    loader = DataLoader(pairs, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True,
                        persistent_workers=num_workers > 0)
    ckpt_dir = stage_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, max_epochs=epochs, default_root_dir=str(stage_dir),
        logger=WandbLogger(project=wandb_project, name=f"evolve/{name}", group=group, save_dir=str(stage_dir),
                           job_type="evolve"),
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_last=True, every_n_epochs=1,
                                   enable_version_counter=False), RichProgressBar()],
        plugins=[AtomicCheckpointIO()], log_every_n_steps=10, enable_model_summary=False,
    )
    if last.is_file():
        print(f"stage '{name}': resuming from {last}")
    trainer.fit(module, loader, ckpt_path=str(last) if last.is_file() else None)
    if trainer.logger is not None and hasattr(trainer.logger, "experiment"):
        trainer.logger.experiment.finish()


def _evaluate(ckpt: str, tests: dict[str, Entry], stage_dir: Path, num_workers: int, min_area: int, max_clicks: int,
              iou_thresholds: list[float], accelerator: str, wandb_project: str, group: str) -> dict:
    """3-click mIoU and NoC of ``ckpt`` on each named test entry (resumable benchmark)."""
    entries = [dict(e) | {"name": n} for n, e in tests.items()]
    data = InteractiveDataModule(test=entries, num_workers=num_workers, min_area=min_area)
    bench = run_benchmark(ckpt, data, out_dir=str(stage_dir / "eval"), variants=["fixed"], max_clicks=max_clicks,
                          iou_thresholds=iou_thresholds, accelerator=accelerator, wandb_project=wandb_project,
                          wandb_group=group)
    row = {}
    for name, variants in bench["results"].items():
        r = variants["fixed"]
        row[name] = {"miou_3click": r["miou_at_click"][2], "noc": r["noc"], "n_objects": r["n_objects"]}
    return row


def _datasets(table: dict) -> list[str]:
    """The evaluated datasets of a stage-by-dataset table, in first-seen order."""
    return list(dict.fromkeys(d for row in table.values() for d in row))


def write_table(out: Path, results: dict) -> None:
    """``table.csv`` (one row per model and dataset) and ``table.png`` (3-click mIoU heat-map)."""
    table = results["table"]
    datasets = _datasets(table)
    buf = io.StringIO()
    w = csv.writer(buf)
    thresholds = sorted({t for row in table.values() for cell in row.values() for t in cell["noc"]})
    w.writerow(["model", "dataset", "miou_3click"] + [f"noc@{t}" for t in thresholds])
    for model, row in table.items():
        for d, cell in row.items():
            w.writerow([model, d, f"{cell['miou_3click']:.4f}"] + [f"{cell['noc'][t]:.2f}" for t in thresholds])
    atomic_write_text(out / "table.csv", buf.getvalue())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.full((len(table), len(datasets)), np.nan)
    for r, row in enumerate(table.values()):
        for c, d in enumerate(datasets):
            if d in row:
                grid[r, c] = row[d]["miou_3click"]
    fig, ax = plt.subplots(figsize=(1.6 * len(datasets) + 2, 0.7 * len(table) + 1.5))
    ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0, vmax=1)
    for r in range(grid.shape[0]):
        for c in range(grid.shape[1]):
            if np.isfinite(grid[r, c]):
                ax.text(c, r, f"{100 * grid[r, c]:.1f}", ha="center", va="center", color="w" if grid[r, c] < 0.6 else "k")
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_yticks(range(len(table)), list(table))
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("model after stage")
    ax.set_title("3-click mIoU (%)")
    fig.tight_layout()
    atomic_write(out / "table.png", lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)


def _log_table(results: dict, project: str, group: str) -> None:
    import wandb

    run = wandb.init(project=project, name="evolve/table", group=group, job_type="evolve", reinit="finish_previous")
    columns = ["model", "dataset", "miou_3click", "noc@85", "noc@90"]
    rows = [[m, d, c["miou_3click"], c["noc"].get("85"), c["noc"].get("90")]
            for m, row in results["table"].items() for d, c in row.items()]
    run.log({"evolution_table": wandb.Table(columns=columns, data=rows)})
    run.summary.update({f"{m}/{d}/miou_3click": c["miou_3click"] for m, row in results["table"].items() for d, c in row.items()})
    run.summary.update({f"pseudo/{k}/{q}": v for k, p in results["pseudo_masks"].items() for q, v in p.items()})
    run.finish()


def print_evolution(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = results["table"]
    datasets = _datasets(table)
    t = Table(title="3-click mIoU (NoC@85 / NoC@90) after each stage")
    t.add_column("model")
    for d in datasets:
        t.add_column(d, justify="right")
    for model, row in table.items():
        t.add_row(model, *[f"{100 * row[d]['miou_3click']:.1f} ({row[d]['noc'].get('85', float('nan')):.2f} / "
                           f"{row[d]['noc'].get('90', float('nan')):.2f})" if d in row else "" for d in datasets])
    Console().print(t)
    for name, q in results["pseudo_masks"].items():
        print(f"pseudo masks {name}: mIoU {q['coarse_miou']:.4f} coarse -> {q['ipt_miou']:.4f} after IPT ({q['n_objects']} objects)")
