"""Benchmark outputs: results.json, per-object CSV, mIoU plot, rich table."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from modules.io import atomic_write, atomic_write_text

RESULTS = "results.json"
PER_OBJECT = "per_object_iou.csv"
PLOT = "miou_vs_clicks.png"


def read_results(out_dir: Path) -> dict | None:
    path = out_dir / RESULTS
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def write_results(out_dir: Path, results: dict) -> None:
    atomic_write_text(out_dir / RESULTS, json.dumps(results, indent=2) + "\n")


def read_rows(out_dir: Path) -> list[list[str]]:
    path = out_dir / PER_OBJECT
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


def write_rows(out_dir: Path, rows: list[list], max_clicks: int) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["dataset", "variant", "object"] + [f"iou_{k}" for k in range(1, max_clicks + 1)])
    w.writerows(rows)
    atomic_write_text(out_dir / PER_OBJECT, buf.getvalue())


def object_rows(dataset: str, variant: str, names: list[str], ious: np.ndarray) -> list[list]:
    return [[dataset, variant, n] + [f"{v:.5f}" for v in row] for n, row in zip(names, ious)]


Line = tuple[np.ndarray, np.ndarray, str]


def save_panels(path: Path, panels: dict[str, list[Line]], xlabel: str, ylabel: str, marker: str | None = None) -> Path:
    """One panel per title, one line per ``(x, y, label)``, IoU axis 0..1, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels.items()):
        for x, y, label in lines:
            ax.plot(x, y, marker=marker, label=label)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return path


def plot_miou(out_dir: Path, results: dict) -> Path:
    """One panel per dataset, one line per variant: mIoU after k clicks."""
    panels = {
        ds: [(np.arange(1, len(r["miou_at_click"]) + 1), np.asarray(r["miou_at_click"]),
              f"{variant} (NoC@90 {r['noc']['90']:.2f})") for variant, r in variants.items()]
        for ds, variants in results["results"].items()
    }
    return save_panels(out_dir / PLOT, panels, "clicks", "mIoU", marker=".")


CURVE = "iou_at_k_vs_images.png"


def iou_at_click_by_order(rows: list[list], click: int = 4) -> dict[tuple[str, str], np.ndarray]:
    """Per (dataset, variant), IoU after ``click`` clicks for each object in sequence order."""
    curves: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        curves.setdefault((row[0], row[1]), []).append(float(row[2 + click]))
    return {k: np.asarray(v) for k, v in curves.items()}


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at every position (fewer at the start)."""
    c = np.cumsum(np.insert(np.asarray(values, float), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_sequence(out_dir: Path, rows: list[list], click: int = 4, window: int = 20) -> Path:
    """IoU@``click`` against the number of images processed (paper A, fig. 3b / 5 right)."""
    panels: dict[str, list[Line]] = {}
    for (ds, variant), values in iou_at_click_by_order(rows, click).items():
        line = (np.arange(1, len(values) + 1), running_mean(values, window), variant)
        panels.setdefault(f"{ds}: IoU@{click} (mean of last {window})", []).append(line)
    return save_panels(out_dir / CURVE, panels, "images processed", f"IoU@{click}")


def results_table(results: dict) -> Table:
    thresholds = [str(round(t * 100)) for t in results["protocol"]["iou_thresholds"]]
    table = Table(title=f"Interactive segmentation benchmark (max {results['protocol']['max_clicks']} clicks)")
    table.add_column("dataset")
    table.add_column("variant")
    for t in thresholds:
        table.add_column(f"NoC@{t}", justify="right")
    for t in thresholds[1:]:
        table.add_column(f"fail@{t}", justify="right")
    ks = [k for k in (1, 3, 5, 10) if k <= results["protocol"]["max_clicks"]]
    for k in ks:
        table.add_column(f"mIoU@{k}", justify="right")
    table.add_column("ms/click", justify="right")
    table.add_column("objects", justify="right")
    for ds, variants in results["results"].items():
        for variant, r in variants.items():
            table.add_row(
                ds,
                variant,
                *[f"{r['noc'][t]:.2f}" for t in thresholds],
                *[str(r["failures"][t]) for t in thresholds[1:]],
                *[f"{r['miou_at_click'][k - 1]:.3f}" for k in ks],
                f"{1000 * r['seconds_per_click']:.1f}",
                str(r["n_objects"]),
            )
    return table


def print_table(results: dict) -> None:
    console = Console()
    if not console.is_terminal:  # logs and CI: wide enough that no column is cut
        console = Console(width=160)
    console.print(results_table(results))
