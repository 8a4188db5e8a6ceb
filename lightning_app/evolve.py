"""``evolve``: paper B's life-long evolution over a sequence of datasets (sec. 3.4).

From the initial model (trained with masks, ``configs/evolve/init.yaml``), each stage
(:class:`Stage`) in order:

1. takes the users' clicks on every object of the stage's dataset (``interactions.json``: the
   simulated users' three clicks, the one read of its masks; or a file of real clicks, e.g. the
   annotation app's);
2. makes pseudo masks from them with the previous stage's model and IPT (``modules.pseudo``),
   with the classifier's verdicts (``pseudo.npz``); their quality against the ground truth is
   measured for the report only (Table 3);
3. trains from the previous stage's weights on pairs of a new object and an object of all earlier
   data (the initial dataset with its masks, earlier stages with their pseudo masks and
   verdicts), Eq. 11; checkpoints every epoch, so a killed stage resumes where it stopped;
4. writes ``model.ckpt`` (a plain model checkpoint; its presence marks the stage complete) and is
   benchmarked on every dataset seen so far.

Every stage folder holds ``stage.json``, the settings that determine it (its data, the method,
the previous stage's); a folder made with other settings is never reused. ``supervision:
ground_truth`` trains on the ground-truth masks instead (the paper's upper bound).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger
from rich.progress import track
from torch.utils.data import DataLoader

from callbacks.checkpoint import RunEnvironment
from callbacks.progress import ProgressLog
from datamodules.datamodule import InteractiveDataModule
from datamodules.evolution import MaskFree, PairedObjects, PseudoLabelled, load_pseudo_masks, record_interactions, save_pseudo_masks
from datamodules.objects import ObjectSource, TrainObjects, image_to_tensor
from datamodules.registry import Concat, build_source, entry_identity
from lightning_app import report
from lightning_app.benchmark import run_benchmark, wandb_run
from lightning_app.checkpoints import file_digest, load_module
from modules.errors import UserError, check
from modules.evolution_module import EvolutionModule
from modules.io import AtomicCheckpointIO, atomic_write_text
from modules.pseudo import PseudoLabelling, pseudo_mask_miou, pseudo_masks, table3_options

Entry = dict[str, Any]


@dataclass(frozen=True)
class StageTraining:
    """How a stage trains (sec. 3.3, Eq. 11).

    Args:
        feature_alignment: feature-alignment and maximum-squares losses, Eq. 7-10 (else
            self-training on the pseudo masks).
        alignment_features: the backbone's deepest features (the paper's), unit-normalised per
            pixel (``deep_unit``) or raw (``deep``), or the ``decoder``'s.
        alignment_weight: weight of Eq. 7/8.
        max_squares_weight: weight of Eq. 9/10.
        unknown_terms: Eq. 8's terms for unknown classes (Table 5): global, pixel.
        corrective_clicks: train with corrective clicks after the three too.
        epochs: epochs per stage over the new dataset's objects (checkpointed each).
        batch_size: pairs per step.
        lr: SGD learning rate.
        replay_final_weight: the earlier data's loss weight moves linearly from 1 to this.
        stage_replay: from the second stage on, each pair also replays an object of the earlier
            stages' pseudo-labelled data (every earlier stage equally likely), beside the
            source replay that stays as it was; without it an earlier stage's 400 objects are
            2 % of a uniform draw from the earlier pool (README: the fundus gain the rooftop stage
            took back).
        warmup: share of the steps with a linear learning-rate warm-up.
        freeze_norm: keep the previous model's normalisation statistics through the stage.
        crop_size: training crop side.
        train_max_side: long side photos are brought to before cropping (``None``: as drawn).
    """

    feature_alignment: bool = False
    alignment_features: Literal["deep_unit", "deep", "decoder"] = "deep_unit"
    alignment_weight: float = 1.0
    max_squares_weight: float = 1.0
    unknown_terms: tuple[Literal["global", "pixel"], ...] = ("global",)
    corrective_clicks: bool = True
    epochs: int = 6
    batch_size: int = 8
    lr: float = 0.002
    replay_final_weight: float = 0.1
    stage_replay: bool = True
    warmup: float = 0.0
    freeze_norm: bool = False
    crop_size: int = 128
    train_max_side: int | None = None

    def __post_init__(self):
        for key, low in (("epochs", 1), ("batch_size", 1), ("crop_size", 8), ("replay_final_weight", 0)):
            check(getattr(self, key) >= low, f"training.{key}={getattr(self, key)}: expected >= {low}")
        check(self.lr > 0, f"training.lr={self.lr}: expected > 0")
        check(0 <= self.warmup < 1, f"training.warmup={self.warmup}: expected in [0, 1)")

    def module(self, previous, known_classes: int, seed: int) -> EvolutionModule:
        """The stage's LightningModule, from the previous stage's model."""
        keys = ("feature_alignment", "alignment_features", "alignment_weight", "max_squares_weight", "corrective_clicks",
                "lr", "replay_final_weight", "warmup", "freeze_norm")
        return EvolutionModule.from_previous(previous, known_classes, seed=seed, unknown_terms=tuple(self.unknown_terms),
                                             **{k: getattr(self, k) for k in keys})

    def pairs(self, new: PseudoLabelled, earlier: list[ObjectSource]) -> PairedObjects:
        """Training pairs: each new object with an object of the earlier data (sec. 3.3), and
        with ``stage_replay`` one of an earlier stage's (``earlier[1:]``)."""
        view = lambda s: TrainObjects(s, self.crop_size, max_positive=1, max_negative=0, click_capacity=16,  # noqa: E731
                                      max_side=self.train_max_side)  # the three clicks are placed in the step
        stages = [view(s) for s in earlier[1:]] if self.stage_replay else None
        return PairedObjects(view(new), [new.class_of(i) for i in range(len(new))], view(Concat(earlier)), stages=stages)


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Stage:
    """One evolution stage in its folder: interactions, pseudo masks, training, the evolved model.
    Each step's output is a file; a rerun does only what is missing."""

    def __init__(self, folder: Path, name: str, settings: dict):
        self.folder, self.name, self.settings = folder, name, settings
        self.key = settings_key(settings)
        self.model_path = folder / "model.ckpt"

    def claim(self, fresh: bool) -> bool:
        """Mark the folder as this stage's; a folder made with other settings is refused (or, with
        ``fresh``, moved aside). Returns whether the stage starts from nothing."""
        marker = self.folder / "stage.json"
        if marker.is_file():
            old = json.loads(marker.read_text())
            if old.get("key") == self.key:
                return False
            if not fresh:
                raise UserError(f"{self.folder} holds stage '{self.name}' made with other settings (its data, the "
                                f"method or an earlier stage changed): choose another --out_dir, or --fresh true to "
                                f"move it aside")
            aside = self.folder.with_name(f"{self.folder.name}.superseded-{time.strftime('%Y%m%d-%H%M%S')}")
            self.folder.rename(aside)
            print(f"stage '{self.name}': earlier work moved to {aside}")
        atomic_write_text(marker, json.dumps({"key": self.key, "settings": self.settings}, indent=1, default=str) + "\n")
        return True

    def interactions(self, source: ObjectSource, clicks_file: str | None) -> list:
        """The users' clicks on the stage's objects (``interactions.json``, recorded once)."""
        return record_interactions(source, self.folder / "interactions.json", clicks_file)

    def pseudo_masks(self, model, images: MaskFree, interactions: list, known: int, options: PseudoLabelling,
                     seed: int) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
        """``modules.pseudo.pseudo_masks`` of the stage's objects with ``model`` (the previous stage's)."""
        tensors = (image_to_tensor(images.get_image(i)) for i in
                   track(range(len(images)), description=f"pseudo masks {images.name}", transient=True))
        return pseudo_masks(model, tensors, interactions, known, options, seed)

    def masks(self, previous: str, source: ObjectSource, known: int, options: PseudoLabelling, supervision: str,
              clicks_file: str | None, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
        """The stage's coarse and refined masks and verdicts (``pseudo.npz``, made once)."""
        path = self.folder / "pseudo.npz"
        if not path.is_file():
            if supervision == "ground_truth":  # the upper bound: masks from the annotation, no clicks
                truth = [source.get_sample(i).mask for i in range(len(source))]
                save_pseudo_masks(path, truth, truth, [-1] * len(truth))
            else:
                interactions = self.interactions(source, clicks_file)
                save_pseudo_masks(path, *self.pseudo_masks(load_module(previous), MaskFree(source), interactions, known,
                                                           options, seed))
        return load_pseudo_masks(path)

    def train(self, module: EvolutionModule, pairs: PairedObjects, training: StageTraining, num_workers: int,
              accelerator: str, wandb_project: str, group: str, seed: int) -> None:
        """Train (or resume) the stage and export ``model.ckpt``."""
        if len(pairs) < training.batch_size:
            raise UserError(f"stage '{self.name}': {len(pairs)} objects with a pseudo mask, fewer than "
                            f"training.batch_size={training.batch_size}")
        pl.seed_everything(seed, workers=True, verbose=False)
        loader = DataLoader(pairs, batch_size=training.batch_size, shuffle=True, num_workers=num_workers, drop_last=True,
                            persistent_workers=num_workers > 0)
        last = self.folder / "checkpoints" / "last.ckpt"
        trainer = pl.Trainer(
            accelerator=accelerator, devices=1, max_epochs=training.epochs, default_root_dir=str(self.folder),
            logger=WandbLogger(project=wandb_project, name=f"evolve/{self.name}", group=group, save_dir=str(self.folder),
                               job_type="evolve"),
            callbacks=[ModelCheckpoint(dirpath=last.parent, filename="{epoch}", save_last=True, every_n_epochs=1,
                                       enable_version_counter=False), RunEnvironment(), ProgressLog(every=60)],
            plugins=[AtomicCheckpointIO()], log_every_n_steps=10, enable_model_summary=False, enable_progress_bar=False,
        )
        if last.is_file():
            print(f"stage '{self.name}': resuming from {last}")
        trainer.fit(module, loader, ckpt_path=str(last) if last.is_file() else None)
        if trainer.logger is not None and hasattr(trainer.logger, "experiment"):
            trainer.logger.experiment.finish()
        module.export(self.model_path)


def check_stages(stages: list[str], catalog: dict[str, dict[str, Any]], supervision: str) -> None:
    unknown = [s for s in stages if s not in catalog]
    if unknown:
        raise UserError(f"stages: unknown dataset(s) {unknown} (expected names from catalog: {sorted(catalog)})")
    if len(set(stages)) != len(stages) or not stages:
        raise UserError(f"stages={stages}: expected at least one, each once")
    for name in stages:
        missing = {"train", "test"} - set(catalog[name])
        if missing:
            raise UserError(f"catalog.{name}: missing key(s) {sorted(missing)}")
    if supervision not in ("clicks", "ground_truth"):
        raise UserError(f"supervision='{supervision}': expected clicks or ground_truth")


def initial_model(init_ckpt: str) -> int:
    """The known classes of the initial model, after checking it is one."""
    h = load_module(init_ckpt).hparams
    if h.num_classes < 1 or h.click_protocol != "three_click":
        raise UserError(f"checkpoint '{init_ckpt}' is not an evolution initial model (needs click_protocol: three_click "
                        f"and num_classes >= 1; train one with `make evolve-init`)")
    return h.num_classes


def open_results(out: Path, init_key: dict, method: dict, fresh: bool) -> dict:
    """``results.json`` of this evolution: what an earlier run of the same initial model and
    method left (a resume), else empty; another one's is refused (or, with ``fresh``, dropped)."""
    init_key, method = (json.loads(json.dumps(d, default=str)) for d in (init_key, method))  # as results.json holds them
    results = report.read_results(out) or {}
    if results and (results.get("init"), results.get("method")) != (init_key, method):
        if not fresh:
            raise UserError(f"{out / report.RESULTS} belongs to another initial model or method: use another --out_dir "
                            "(or --fresh true)")
        results = {}
    results.update({"init": init_key, "method": method})
    for key in ("table", "objects", "pseudo_masks", "seconds"):
        results.setdefault(key, {})
    return results


def run_evolution(
    init_ckpt: str = "runs/evolve_init/checkpoints/last.ckpt",
    stages: list[str] = ["fundus", "rooftop"],  # noqa: B006
    catalog: dict[str, dict[str, Any]] = {  # noqa: B006
        "fundus": {"train": {"dataset": "synthetic", "domain": "fundus", "length": 400, "seed": 5},
                   "test": {"dataset": "synthetic", "domain": "fundus", "length": 200, "seed": 2}},
        "rooftop": {"train": {"dataset": "synthetic", "domain": "rooftop", "length": 400, "seed": 5},
                    "test": {"dataset": "synthetic", "domain": "rooftop", "length": 200, "seed": 2}},
    },
    source_replay: Entry = {"dataset": "synthetic", "domain": "source", "length": 20000, "seed": 0},  # noqa: B006
    source_test: Entry = {"dataset": "synthetic", "domain": "source", "length": 300, "seed": 2},  # noqa: B006
    out_dir: str = "runs/evolve",
    supervision: Literal["clicks", "ground_truth"] = "clicks",
    pseudo: PseudoLabelling = PseudoLabelling(),
    training: StageTraining = StageTraining(),
    min_area: int | None = None,
    max_clicks: int = 20,
    iou_thresholds: list[float] = [0.85, 0.9],  # noqa: B006
    measure_pseudo_masks: bool = True,
    ipt_table: bool = False,
    num_workers: int = 1,
    fresh: bool = False,
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
            trained on), its ``test`` entry (benchmark), and optionally ``clicks``: a file of real
            clicks on the train objects (the annotation app's ``<out>.clicks.json``) to use
            instead of simulated ones.
        source_replay: the initial dataset with masks, replayed in every stage.
        source_test: the initial dataset's benchmark entry.
        out_dir: stage folders, results.json, table.csv, table.md, table.png, wandb.
        supervision: ``clicks`` (the method) or ``ground_truth`` (the upper bound: the stage
            trains on the true masks).
        pseudo: how the pseudo masks are made (``pseudo.ipt``: refine them with IPT; IPT's
            parameters; ``modules.pseudo.PseudoLabelling``).
        training: how each stage trains (``StageTraining``).
        min_area: objects below this many pixels are skipped (``None``: the data config's default).
        max_clicks: clicks per object in the benchmark (the three count).
        iou_thresholds: NoC targets.
        measure_pseudo_masks: report pseudo-mask mIoU against the ground truth (Table 3).
        ipt_table: measure the pseudo masks of every row of paper B's Table 3.
        num_workers: dataloader workers.
        fresh: move aside stage folders made with other settings instead of stopping.
        seed: seed of IPT's point sampling, of the classifier's new output and of training.
        accelerator: Lightning accelerator.
        wandb_project: wandb project (offline unless WANDB_MODE says otherwise).
    """
    check_stages(stages, catalog, supervision)
    known = initial_model(init_ckpt)
    out = Path(out_dir)
    method = {"supervision": supervision, "pseudo": asdict(pseudo), **asdict(training), "seed": seed}
    init_key = {"checkpoint": str(init_ckpt), "sha256_16": file_digest(init_ckpt), "source_replay": entry_identity(source_replay)}
    results = open_results(out, init_key, method, fresh)
    results.update({"stages": list(stages), "protocol": {"max_clicks": max_clicks, "iou_thresholds": list(iou_thresholds),
                                                         "initial_clicks": 3}})
    group = out.resolve().name
    tests = {"source": source_test} | {name: catalog[name]["test"] for name in stages}

    def evaluate(ckpt: str, names: list[str], folder: Path, label: str) -> None:
        row, objects = _evaluate(ckpt, {k: tests[k] for k in names}, folder, num_workers, min_area, max_clicks,
                                 iou_thresholds, accelerator, wandb_project, group, fresh)
        results["table"][label], results["objects"][label] = row, objects
        report.write_results(out, results)

    evaluate(str(init_ckpt), list(tests), out / "init", "init")  # the baseline on every dataset
    previous, key = str(init_ckpt), settings_key(init_key)
    earlier: list[ObjectSource] = [build_source(source_replay, "source_replay", min_area)]
    for t, name in enumerate(stages, start=1):
        data = {k: entry_identity(v) if k in ("train", "test") else v for k, v in catalog[name].items()}
        stage = Stage(out / f"stage{t}_{name}", name, {"previous": key, "data": data, "method": method, "min_area": min_area})
        if stage.claim(fresh):  # what an earlier stage of this name measured is not this one's
            for table in ("pseudo_masks", "seconds"):
                results[table].pop(name, None)
        key = stage.key
        start, worked = time.perf_counter(), not stage.model_path.is_file()
        train_source = build_source(catalog[name]["train"], f"catalog.{name}.train", min_area)
        coarse, refined, verdicts = stage.masks(previous, train_source, known, pseudo, supervision,
                                                catalog[name].get("clicks"), seed)
        masks = refined if pseudo.ipt else coarse
        if measure_pseudo_masks and name not in results["pseudo_masks"]:
            sets = {"coarse": coarse, "refined": refined}
            if ipt_table and supervision == "clicks":
                interactions, model = stage.interactions(train_source, catalog[name].get("clicks")), load_module(previous)
                sets = {row: stage.pseudo_masks(model, MaskFree(train_source), interactions, known, options, seed)[1]
                        for row, options in table3_options(pseudo).items()}
            truths = [(s.mask, s.ignore) for s in map(train_source.get_sample, range(len(train_source)))]
            results["pseudo_masks"][name] = pseudo_mask_miou(sets, truths)  # measured for the report only
            report.write_results(out, results)
        new = PseudoLabelled(MaskFree(train_source), masks, verdicts)
        if not stage.model_path.is_file():
            stage.train(training.module(load_module(previous), known, seed), training.pairs(new, earlier), training,
                        num_workers, accelerator, wandb_project, group, seed + t)
        if worked:  # a rerun that finds the stage done adds nothing to its time
            results["seconds"][name] = results["seconds"].get(name, 0.0) + time.perf_counter() - start
        evaluate(str(stage.model_path), ["source"] + stages[:t], stage.folder, f"+{name}")
        previous = str(stage.model_path)
        earlier.append(PseudoLabelled(MaskFree(train_source), masks, verdicts, name))

    files = report.write_evolution(out, results)
    _log_table(results, wandb_project, group, out)
    report.print_evolution(results)
    print(f"results: {out / report.RESULTS}  also: {', '.join(str(f) for f in files)}")
    return results


def _evaluate(ckpt: str, tests: dict[str, Entry], folder: Path, num_workers: int, min_area: int | None, max_clicks: int,
              iou_thresholds: list[float], accelerator: str, wandb_project: str, group: str, fresh: bool
              ) -> tuple[dict, dict]:
    """Benchmark ``ckpt`` on each named test entry (resumable; with ``fresh``, results of another
    protocol are moved aside): the table's row and the per-object 3-click IoUs."""
    entries = [dict(e) | {"name": n} for n, e in tests.items()]
    data = InteractiveDataModule(test=entries, num_workers=num_workers, min_area=min_area)
    bench = run_benchmark(ckpt, data, out_dir=str(folder / "eval"), variants=["fixed"], max_clicks=max_clicks,
                          iou_thresholds=iou_thresholds, fresh=fresh, accelerator=accelerator,
                          wandb_project=wandb_project, wandb_group=group)
    row, objects = {}, {}
    for name, variants in bench["results"].items():
        r = variants["fixed"]
        objects[name] = [ious[2] for ious in bench["objects"][name]["fixed"]["ious"]]
        row[name] = {"miou_3click": float(np.mean(objects[name])), "noc": r["noc"], "noc_ci95": r["noc_ci95"],
                     "n_objects": r["n_objects"]}
    return row, objects


def _log_table(results: dict, project: str, group: str, out: Path) -> None:
    import wandb

    run = wandb_run(project, group, out, "evolve/table", job_type="evolve")
    columns = ["model", "dataset", "miou_3click"] + [f"noc@{t}" for t in next(iter(next(iter(results["table"].values())).values()))["noc"]]
    rows = [[m, d, c["miou_3click"], *c["noc"].values()] for m, row in results["table"].items() for d, c in row.items()]
    run.log({"evolution_table": wandb.Table(columns=columns, data=rows)})
    run.summary.update({f"{m}/{d}/miou_3click": c["miou_3click"] for m, row in results["table"].items() for d, c in row.items()})
    run.finish()
