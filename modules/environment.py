"""What a run's numbers depend on beyond its config and seed: the CPU, torch's thread count and
the versions of the numeric libraries (README, Reproducibility). Checkpoints and every benchmark
row keep it, so that two results can be told apart when they come from different machines."""
from __future__ import annotations

import functools
import platform
from importlib.metadata import PackageNotFoundError, version

import torch

PACKAGES = ("torch", "numpy", "scipy", "opencv-python-headless", "albumentations", "scikit-image", "timm")


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows of it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bfloat16 kernels on this CPU (AVX-512 or AMX). Where it does not,
    bfloat16 autocast falls back to slow reference kernels (training is then slower, not faster)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def environment() -> dict:
    """The machine and library versions a result was computed with."""
    return {"cpu": cpu_model(), "cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
            **{p: _version(p) for p in PACKAGES}}


def differences(saved: dict, now: dict) -> list[str]:
    """``key saved -> now`` for each recorded key whose value changed (keys ``saved`` lacks are
    not compared: older checkpoints kept only the thread count)."""
    return [f"{k} {saved[k]} -> {now.get(k)}" for k in saved if saved[k] != now.get(k)]
