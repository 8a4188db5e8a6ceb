"""Benchmark outputs, all derived from ``results.json`` and driven by its ``protocol``:
the per-object CSV, the mIoU and sequence plots, the rich table and a markdown table.

``results.json``::

    {"protocol": {"max_clicks", "iou_thresholds", "target_iou", "paper_thresholds", "clicker"},
     "model": {...}, "data": {...},
     "results": {DATASET: {VARIANT: {"noc", "noc_ci95", "failures", "miou_at_click", ...}}},
     "objects": {DATASET: {VARIANT: {"names": [...], "ious": [[...], ...]}}}}
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from modules.errors import UserError
from modules.io import atomic_write, atomic_write_text
from modules.metrics import threshold_key

RESULTS = "results.json"
PER_OBJECT = "per_object_iou.csv"
PLOT = "miou_vs_clicks.png"
CURVE = "iou_at_k_vs_images.png"
MARKDOWN = "results.md"


def read_results(out_dir: Path) -> dict | None:
    path = Path(out_dir) / RESULTS
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def write_results(out_dir: Path, results: dict) -> None:
    atomic_write_text(Path(out_dir) / RESULTS, json.dumps(results, indent=1) + "\n")


def headline_threshold(protocol: dict, dataset: str) -> str:
    """The threshold a dataset is reported at first: the paper's for it when the protocol names
    one (paper A, Table 3: DRIONS-DB at 90%, Rooftop at 80%), else the highest."""
    t = protocol.get("paper_thresholds", {}).get(dataset)
    return threshold_key(t if t in protocol["iou_thresholds"] else max(protocol["iou_thresholds"]))


def write_per_object(out_dir: Path, results: dict) -> Path:
    """``per_object_iou.csv``: IoU after every click for every object and variant."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["dataset", "variant", "object"] + [f"iou_{k}" for k in range(1, results["protocol"]["max_clicks"] + 1)])
    for ds, variants in results.get("objects", {}).items():
        for variant, objects in variants.items():
            for name, row in zip(objects["names"], objects["ious"]):
                w.writerow([ds, variant, name] + [f"{v:.5f}" for v in row])
    return atomic_write_text(Path(out_dir) / PER_OBJECT, buf.getvalue())


Line = tuple[np.ndarray, np.ndarray, str]


def save_panels(path: Path, panels: dict[str, list[Line]], xlabel: str, ylabel: str, marker: str | None = None,
                bands: dict[str, list[tuple[np.ndarray, np.ndarray]]] | None = None) -> Path:
    """One panel per title, one line per ``(x, y, label)`` (with an optional shaded band per
    line), IoU axis 0..1, written atomically. A preset from a sub-folder (label ``zoom/sa ...``)
    is drawn dashed in the colour of the variant it is a preset of (``sa``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, lines) in zip(axes[0], panels.items()):
        order: dict[str, int] = {}  # variant (without its preset folder) -> its colour's index
        for i, (x, y, label) in enumerate(lines):
            variant = label.split(" ")[0]
            colour = colours[order.setdefault(variant.rsplit("/", 1)[-1], len(order)) % len(colours)]
            (line,) = ax.plot(x, y, marker=marker, label=label, color=colour, linestyle="--" if "/" in variant else "-")
            if bands and title in bands:
                lo, hi = bands[title][i]
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return path


def plot_miou(out_dir: Path, results: dict) -> Path:
    """One panel per dataset, one line per variant: mIoU after k clicks with its bootstrap 95%
    band; the legend gives NoC at the dataset's headline threshold."""
    from modules.metrics import bootstrap_interval

    panels, bands = {}, {}
    for ds, variants in results["results"].items():
        t = headline_threshold(results["protocol"], ds)
        panels[ds] = [(np.arange(1, len(r["miou_at_click"]) + 1), np.asarray(r["miou_at_click"]),
                       f"{v} (NoC@{t} {r['noc'][t]:.2f})") for v, r in variants.items()]
        objects = results.get("objects", {}).get(ds, {})
        if all(v in objects for v in variants):
            bands[ds] = [tuple(np.asarray(b) for b in bootstrap_interval(np.asarray(objects[v]["ious"]))) for v in variants]
    return save_panels(Path(out_dir) / PLOT, panels, "clicks", "mIoU", marker=".", bands=bands)


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at every position (fewer at the start)."""
    c = np.cumsum(np.insert(np.asarray(values, float), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_sequence(out_dir: Path, results: dict, click: int = 4, window: int = 20) -> Path:
    """IoU@``click`` against the number of images processed (paper A, fig. 3b / 5 right): the
    sequence-adaptation learning curve."""
    panels: dict[str, list[Line]] = {}
    for ds, variants in results.get("objects", {}).items():
        for variant, objects in variants.items():
            values = np.asarray(objects["ious"])[:, click - 1]
            panels.setdefault(f"{ds}: IoU@{click} (mean of last {window})", []).append(
                (np.arange(1, len(values) + 1), running_mean(values, window), variant))
    return save_panels(Path(out_dir) / CURVE, panels, "images processed", f"IoU@{click}")


def _clicks_shown(max_clicks: int) -> list[int]:
    return [k for k in (1, 3, 5, 10, 20) if k <= max_clicks]


def results_table(results: dict) -> Table:
    protocol = results["protocol"]
    thresholds = [threshold_key(t) for t in protocol["iou_thresholds"]]
    table = Table(title=f"Interactive segmentation benchmark (max {protocol['max_clicks']} clicks, "
                        f"NoC with bootstrap 95% interval)")
    for name in ["dataset", "variant", *[f"NoC@{t}" for t in thresholds], f"fail@{thresholds[-1]}",
                 *[f"mIoU@{k}" for k in _clicks_shown(protocol["max_clicks"])], "ms/click", "repeat", "repeat (user)", "objects"]:
        table.add_column(name, justify="left" if name in ("dataset", "variant") else "right")
    for ds, variants in results["results"].items():
        for variant, r in variants.items():
            lo_hi = r.get("noc_ci95", {})
            table.add_row(
                ds, variant,
                *[f"{r['noc'][t]:.2f}" + (f" [{lo_hi[t][0]:.1f}, {lo_hi[t][1]:.1f}]" if t in lo_hi else "") for t in thresholds],
                str(r["failures"][thresholds[-1]]),
                *[f"{r['miou_at_click'][k - 1]:.3f}" for k in _clicks_shown(protocol["max_clicks"])],
                f"{1000 * r['seconds_per_click']:.1f}", f"{r.get('repeated_click_fraction', float('nan')):.2f}",
                f"{r.get('repeated_user_click_fraction', float('nan')):.2f}", str(r["n_objects"]),
            )
    return table


def print_table(results: dict) -> None:
    console = Console()
    if not console.is_terminal:  # logs and CI: wide enough that no column is cut
        console = Console(width=200)
    console.print(results_table(results))


def markdown_table(results: dict) -> str:
    """The results as a markdown table (what the README quotes), with the headline threshold of
    each dataset marked."""
    protocol = results["protocol"]
    thresholds = [threshold_key(t) for t in protocol["iou_thresholds"]]
    ks = _clicks_shown(protocol["max_clicks"])
    head = ["dataset", "variant", *[f"NoC@{t} [95% CI]" for t in thresholds], f"fail@{thresholds[-1]}",
            *[f"mIoU@{k}" for k in ks], "ms/click", "repeat", "repeat (user)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ds, variants in results["results"].items():
        headline = headline_threshold(protocol, ds)
        for variant, r in variants.items():
            ci = r.get("noc_ci95", {})
            cells = [f"{'**' if t == headline else ''}{r['noc'][t]:.2f}{'**' if t == headline else ''}"
                     + (f" [{ci[t][0]:.1f}, {ci[t][1]:.1f}]" if t in ci else "") for t in thresholds]
            lines.append("| " + " | ".join([ds, variant, *cells, str(r["failures"][thresholds[-1]]),
                                            *[f"{r['miou_at_click'][k - 1]:.3f}" for k in ks],
                                            f"{1000 * r['seconds_per_click']:.1f}",
                                            f"{r.get('repeated_click_fraction', float('nan')):.2f}",
                                            f"{r.get('repeated_user_click_fraction', float('nan')):.2f}"]) + " |")
    return "\n".join(lines) + "\n"


def write_reports(out_dir: Path, results: dict) -> list[Path]:
    """Every file derived from ``results.json``: CSV, plots, markdown."""
    out_dir = Path(out_dir)
    click = min(4, results["protocol"]["max_clicks"])
    return [write_per_object(out_dir, results), plot_miou(out_dir, results), plot_sequence(out_dir, results, click),
            atomic_write_text(out_dir / MARKDOWN, markdown_table(results))]


# -- spread over training runs ------------------------------------------------------------------
SPREAD = "spread.json"


def _run_quantities(run: dict, ds: str, variant: str, ks: list[int]) -> dict[str, float]:
    """One run's numbers for a dataset's variant: NoC per threshold, mIoU@k, repeated clicks and
    the ratios the targets are stated in: NoC over ``fixed``'s (another variant) and, at a
    dataset's paper threshold, NoC over the first dataset's (the domain gap, e.g. rooftop over
    source)."""
    protocol, results = run["protocol"], run["results"]
    row, first = results[ds][variant], next(iter(results))
    thresholds = [threshold_key(t) for t in protocol["iou_thresholds"]]
    values = {f"noc@{t}": row["noc"][t] for t in thresholds}
    values.update({f"miou@{k}": row["miou_at_click"][k - 1] for k in ks})
    values.update({name: row[key] for name, key in (("repeat", "repeated_click_fraction"),
                                                    ("repeat (user)", "repeated_user_click_fraction")) if key in row})
    fixed = results[ds].get("fixed")
    if variant != "fixed" and fixed is not None:
        values.update({f"noc@{t} / fixed": row["noc"][t] / fixed["noc"][t] for t in thresholds})
    paper = protocol.get("paper_thresholds", {}).get(ds)
    if paper is not None and ds != first and variant in results[first]:
        t = threshold_key(paper)
        values[f"noc@{t} / {first}"] = row["noc"][t] / results[first][variant]["noc"][t]
    return values


def _spread_of(v: list[float]) -> dict:
    return {"runs": v, "mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
            "min": float(np.min(v)), "max": float(np.max(v))}


def seed_spread(runs: dict[str, dict]) -> dict:
    """Across benchmark runs (``results.json`` of models trained with different seeds, on the same
    protocol and objects): per dataset and variant, each run's NoC per threshold, mIoU@k, repeated
    clicks and the target ratios (:func:`_run_quantities`), and their mean, standard deviation
    (n - 1), minimum and maximum. The bootstrap intervals of one run say how much the objects move
    a number; this says how much the training run does."""
    first = next(iter(runs.values()))
    protocol, ks = first["protocol"], _clicks_shown(first["protocol"]["max_clicks"])
    table: dict = {}
    for ds, variants in first["results"].items():
        for variant in variants:
            if any(variant not in r["results"].get(ds, {}) for r in runs.values()):
                continue  # a variant not run on every model has no spread
            each = [_run_quantities(r, ds, variant, ks) for r in runs.values()]
            keys = [k for k in each[0] if all(k in e for e in each)]
            table.setdefault(ds, {})[variant] = {key: _spread_of([e[key] for e in each]) for key in keys}
    return {"protocol": protocol, "data": first.get("data"),
            "runs": {name: {"checkpoint": r["model"]["checkpoint"], "sha256_16": r["model"]["sha256_16"]} for name, r in runs.items()},
            "results": table}


def spread_markdown(spread: dict) -> str:
    """The spread as markdown: NoC and mIoU@k as mean ± sd [min, max] over the runs, then the
    repeated clicks and the ratios with each run's value."""
    protocol = spread["protocol"]
    keys = [f"noc@{threshold_key(t)}" for t in protocol["iou_thresholds"]] + \
        [f"miou@{k}" for k in _clicks_shown(protocol["max_clicks"])]
    head = ["dataset", "variant", *[k.replace("noc", "NoC").replace("miou", "mIoU") for k in keys]]
    lines = [f"{len(spread['runs'])} runs ({', '.join(spread['runs'])}): mean ± sd [min, max] over the runs", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    def cell(v: dict, d: int) -> str:
        return f"{v['mean']:.{d}f} ± {v['sd']:.{d}f} [{v['min']:.{d}f}, {v['max']:.{d}f}]"

    for ds, variants in spread["results"].items():
        for variant, values in variants.items():
            lines.append("| " + " | ".join([ds, variant, *[cell(values[k], 2 if k.startswith("noc") else 3) for k in keys]]) + " |")
    lines += ["", "| dataset | variant | quantity | mean ± sd [min, max] | each run |", "|---|---|---|---|---|"]
    for ds, variants in spread["results"].items():
        for variant, values in variants.items():
            for key, v in values.items():
                if key not in keys:
                    lines.append(f"| {ds} | {variant} | {key.replace('noc', 'NoC')} | {cell(v, 2)} | "
                                 f"{' / '.join(f'{x:.2f}' for x in v['runs'])} |")
    return "\n".join(lines) + "\n"


def run_spread(runs: list[str], out_dir: str = "runs/spread") -> dict:
    """NoC and mIoU@k of one benchmark across models trained with different seeds.

    Each run is a ``benchmark`` output folder (``results.json``); writes spread.json, spread.md.

    Args:
        runs: the benchmark output folders, one per trained model (at least two).
        out_dir: where spread.json and spread.md go.
    """
    if len(runs) < 2:
        raise UserError(f"spread: runs: expected at least two benchmark folders, got {runs}")
    loaded = {}
    for run in runs:
        results = read_results(Path(run))
        if results is None:
            raise UserError(f"spread: {Path(run) / RESULTS}: missing or not JSON (run `benchmark --out_dir {run}` first)")
        loaded[run] = results
    reference = loaded[runs[0]]
    for run, results in loaded.items():
        if results.get("protocol") != reference.get("protocol") or results.get("datasets") != reference.get("datasets") or \
                results.get("data", {}).get("test") != reference.get("data", {}).get("test"):
            raise UserError(f"spread: {Path(run) / RESULTS}: its protocol or test data differ from "
                            f"{Path(runs[0]) / RESULTS}'s (a spread compares one benchmark across models)")
    spread = seed_spread(loaded)
    out = Path(out_dir)
    atomic_write_text(out / SPREAD, json.dumps(spread, indent=1) + "\n")
    text = spread_markdown(spread)
    atomic_write_text(out / "spread.md", text)
    print(text, end="")
    print(f"spread: {out / SPREAD}  also: {out / 'spread.md'}")
    return spread


# -- life-long evolution (paper B) -------------------------------------------------------------
def evolution_cells(results: dict) -> list[dict]:
    """One entry per (model, dataset) of an evolution: 3-click mIoU with its bootstrap 95%
    interval, and its change against the initial model on the same objects (paired bootstrap)."""
    from modules.metrics import bootstrap_interval

    objects = results.get("objects", {})
    cells = []
    for model, row in results["table"].items():
        for ds, cell in row.items():
            ious = np.asarray(objects.get(model, {}).get(ds, []), float)
            base = np.asarray(objects.get("init", {}).get(ds, []), float)
            entry = {"model": model, "dataset": ds, "miou_3click": cell["miou_3click"], "noc": cell["noc"]}
            if len(ious):
                entry["ci95"] = bootstrap_interval(ious)
            if model != "init" and len(ious) and len(base) == len(ious):
                entry["change"] = float((ious - base).mean())
                entry["change_ci95"] = bootstrap_interval(ious - base)
            cells.append(entry)
    return cells


def _datasets(table: dict) -> list[str]:
    return list(dict.fromkeys(d for row in table.values() for d in row))


def _cell_text(c: dict, markdown: bool = False) -> str:
    text = f"{100 * c['miou_3click']:.1f}"
    if "ci95" in c:
        text += f" [{100 * c['ci95'][0]:.1f}, {100 * c['ci95'][1]:.1f}]"
    if "change" in c:
        text += f" ({100 * c['change']:+.1f} [{100 * c['change_ci95'][0]:+.1f}, {100 * c['change_ci95'][1]:+.1f}])"
    return text


def evolution_markdown(results: dict) -> str:
    """The stage-by-dataset table (3-click mIoU %, 95% interval, change against the initial
    model with its paired interval), NoC beneath, and the pseudo-mask table."""
    table = results["table"]
    datasets = _datasets(table)
    cells = {(c["model"], c["dataset"]): c for c in evolution_cells(results)}
    lines = ["| model after stage | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for model in table:
        lines.append(f"| {model} | " + " | ".join(_cell_text(cells[(model, d)]) if (model, d) in cells else ""
                                                for d in datasets) + " |")
    protocol = results.get("protocol", {})
    thresholds = [threshold_key(t) for t in protocol.get("iou_thresholds", [])]
    if thresholds and protocol.get("max_clicks", 20) > 3:  # three clicks only (the ablations): no NoC to speak of
        lines += ["", "| model after stage | " + " | ".join(f"{d} NoC@{'/'.join(thresholds)}" for d in datasets) + " |",
                  "|---|" + "---|" * len(datasets)]
        for model, row in table.items():
            lines.append(f"| {model} | " + " | ".join(" / ".join(f"{row[d]['noc'][t]:.2f}" for t in thresholds)
                                                    if d in row else "" for d in datasets) + " |")
    for name, q in results.get("pseudo_masks", {}).items():
        rows = [k for k in q if k != "n_objects"]
        lines += ["", f"pseudo masks of {name} ({q['n_objects']} objects), mIoU % against the ground truth:", "",
                  "| " + " | ".join(rows) + " |", "|" + "---|" * len(rows),
                  "| " + " | ".join(f"{100 * q[r]['miou']:.1f} [{100 * q[r]['ci95'][0]:.1f}, {100 * q[r]['ci95'][1]:.1f}]"
                                    for r in rows) + " |"]
    return "\n".join(lines) + "\n"


def write_evolution(out_dir: Path, results: dict) -> list[Path]:
    """``table.csv`` (one row per model and dataset), ``table.md`` and ``table.png`` (heat-map)."""
    out_dir = Path(out_dir)
    table = results["table"]
    datasets = _datasets(table)
    buf = io.StringIO()
    w = csv.writer(buf)
    thresholds = sorted({t for row in table.values() for cell in row.values() for t in cell["noc"]})
    w.writerow(["model", "dataset", "miou_3click", "ci95_low", "ci95_high", "change", "change_ci95_low",
                "change_ci95_high"] + [f"noc@{t}" for t in thresholds])
    for c in evolution_cells(results):
        ci, ch = c.get("ci95", ["", ""]), c.get("change_ci95", ["", ""])
        w.writerow([c["model"], c["dataset"], f"{c['miou_3click']:.4f}", *ci, c.get("change", ""), *ch]
                   + [f"{c['noc'][t]:.2f}" for t in thresholds])
    paths = [atomic_write_text(out_dir / "table.csv", buf.getvalue()),
             atomic_write_text(out_dir / "table.md", evolution_markdown(results))]

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
    paths.append(atomic_write(out_dir / "table.png", lambda f: fig.savefig(f, format="png", dpi=110), mode="wb"))
    plt.close(fig)
    return paths


def print_evolution(results: dict) -> None:
    table = results["table"]
    datasets = _datasets(table)
    cells = {(c["model"], c["dataset"]): c for c in evolution_cells(results)}
    t = Table(title="3-click mIoU % [95% interval] (change against init [paired 95% interval])")
    t.add_column("model")
    for d in datasets:
        t.add_column(d, justify="right")
    for model in table:
        t.add_row(model, *[_cell_text(cells[(model, d)]) if (model, d) in cells else "" for d in datasets])
    console = Console() if Console().is_terminal else Console(width=200)
    console.print(t)
    for name, q in results.get("pseudo_masks", {}).items():
        print(f"pseudo masks {name}: " + ", ".join(f"{k} {100 * v['miou']:.1f}" for k, v in q.items() if k != "n_objects"))
