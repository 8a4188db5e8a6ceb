"""The command line end to end: train, benchmark, resume, print_config and bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_DATA, synthetic, tiny_fit_args

from lightning_app.cli import CLI, main

BENCH = ["--data.test", f"[{synthetic('source', 3)}, {synthetic('fundus', 3)}, {synthetic('rooftop', 3)}]",
         "--data.num_workers", "0", "--data.min_area", "64", "--max_clicks", "20", "--variants", "[fixed]"]


def run_cli(*args, timeout=180):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lightning_app", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fast_dev_run(optimizer):
    assert main(["fit", "--config", str(ROOT / "configs/train_init.yaml"),
                 "--config", str(ROOT / "configs/debug/fdr.yaml"), "--model.optimizer", optimizer, *TINY_DATA]) == 0


@pytest.mark.parametrize("has_bf16, trained_in", [(True, "bf16-mixed"), (False, "32-true")])
def test_bf16_training_only_where_the_cpu_has_bf16_kernels(tmp_path, monkeypatch, capsys, has_bf16, trained_in):
    monkeypatch.setattr("lightning_app.cli.cpu_has_bf16", lambda: has_bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen, fit = [], CLI.fit
    monkeypatch.setattr(CLI, "fit", lambda self, *a, **k: (seen.append(self.trainer.precision), fit(self, *a, **k)))
    assert main(tiny_fit_args(tmp_path, steps=2) + ["--trainer.precision", "bf16-mixed"]) == 0
    assert seen == [trained_in]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert ("has no bfloat16 kernels" in capsys.readouterr().err) is not has_bf16


def test_checkpoint_carries_the_full_config(tiny_ckpt):
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["backbone"] == "resnet10t"
    assert ckpt["hyper_parameters"]["aspp_channels"] == 32
    assert ckpt["datamodule_hyper_parameters"]["train"][0]["size"] == 64
    assert (tiny_ckpt.parent.parent / "config.yaml").is_file()


def test_resume_continues_from_last(tmp_path, capsys):
    assert main(tiny_fit_args(tmp_path, steps=2)) == 0
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2
    assert main(tiny_fit_args(tmp_path, steps=4) + ["--ckpt_path", str(last)]) == 0
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4
    finished = last.read_bytes()
    assert main(tiny_fit_args(tmp_path, steps=4) + ["--ckpt_path", "last"]) == 0  # a finished run, run again
    assert last.read_bytes() == finished  # untouched: its digest keys the MAS importance and benchmark results
    assert "is trained to step 4 of 4: nothing to do" in capsys.readouterr().out


def test_benchmark_writes_results_and_resumes(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["benchmark", "--config", str(ROOT / "configs/benchmark.yaml"), "--ckpt", str(tiny_ckpt),
            "--out_dir", str(out), *BENCH]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"] == {"max_clicks": 20, "iou_thresholds": [0.8, 0.85, 0.9], "target_iou": 0.9,
                                   "paper_thresholds": {"fundus": 0.9, "rooftop": 0.8}, "clicker": "ritm-not-clicked"}
    assert list(results["results"]) == ["source", "fundus", "rooftop"]
    for ds, variants in results["results"].items():
        r = variants["fixed"]
        assert set(r["noc"]) == {"80", "85", "90"} and set(r["failures"]) >= {"85", "90"}
        assert len(r["miou_at_click"]) == 20 and r["n_objects"] == 3
        assert 1 <= r["noc"]["80"] <= r["noc"]["85"] <= r["noc"]["90"] <= 20
        assert r["seconds_per_click"] > 0
    rows = (out / "per_object_iou.csv").read_text().splitlines()
    assert rows[0].startswith("dataset,variant,object,iou_1,") and len(rows) == 1 + 9
    assert (out / "miou_vs_clicks.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "NoC@90" in table and "rooftop" in table
    before = (out / "results.json").stat().st_mtime_ns
    assert main(args) == 0  # everything done: nothing is recomputed
    assert "already in" in capsys.readouterr().out
    assert (out / "results.json").stat().st_mtime_ns == before
    assert main(args + ["--max_clicks", "5"]) == 2  # another protocol on the same folder: refused, nothing lost
    assert "holds results of another checkpoint or protocol" in capsys.readouterr().err
    assert (out / "results.json").stat().st_mtime_ns == before
    assert main(args + ["--max_clicks", "5", "--iou_thresholds", "[0.5, 0.7]", "--fresh", "true"]) == 0
    moved = list(out.glob("superseded-*/results.json"))
    assert len(moved) == 1 and json.loads(moved[0].read_text())["protocol"]["max_clicks"] == 20
    redone = json.loads((out / "results.json").read_text())
    assert set(redone["results"]["fundus"]["fixed"]["noc"]) == {"50", "70"}  # outputs follow the thresholds
    assert "NoC@70" in capsys.readouterr().out and "NoC@70" in (out / "results.md").read_text()


def test_a_variant_whose_settings_changed_runs_again(capsys):
    from callbacks.adaptation import variant_spec
    from lightning_app.benchmark import forget_changed_variants

    adapt = ROOT / "configs/adapt"
    sa = {"name": "sa_photo", "sequence": {"inputs": "states", "lr": 1.0e-5}}
    spec = variant_spec(sa, adapt)
    assert spec["sequence"]["lr"] == 1.0e-5 and "gamma" in spec["sequence"]  # defaults resolved too
    assert variant_spec("fixed", adapt) == {"click_labels": {"radius": 1.0}} and json.loads(json.dumps(spec)) == spec
    assert variant_spec({"name": "net", "click_labels": {"radius": 0}}, adapt) == {"click_labels": {"radius": 0}}
    results = {"results": {"grabcut": {"fixed": 1, "sa_photo": 2}}, "objects": {"grabcut": {"fixed": 1, "sa_photo": 2}}}
    assert forget_changed_variants(results, {"fixed": {}, "sa_photo": spec})  # results from before: recorded, nothing dropped
    assert "written before variant settings were recorded" in capsys.readouterr().out
    assert results["results"]["grabcut"] == {"fixed": 1, "sa_photo": 2} and results["variants"]["sa_photo"] == spec
    faster = variant_spec({**sa, "sequence": {"inputs": "states", "lr": 1.0e-4}}, adapt)
    assert not forget_changed_variants(results, {"fixed": {}, "sa_photo": spec})  # the same settings: nothing to do
    assert forget_changed_variants(results, {"fixed": {}, "sa_photo": faster})
    assert results["results"]["grabcut"] == {"fixed": 1} and results["objects"]["grabcut"] == {"fixed": 1}
    assert results["variants"]["sa_photo"] == faster
    assert "sa_photo: its settings changed since it ran, running it again" in capsys.readouterr().out
    older = json.loads(json.dumps(faster))
    del older["sequence"]["optimizer"]  # a record written before the setting existed
    results["variants"]["sa_photo"] = older
    results["results"]["grabcut"]["sa_photo"] = results["objects"]["grabcut"]["sa_photo"] = 3
    assert forget_changed_variants(results, {"fixed": {}, "sa_photo": faster})  # recorded again, kept
    assert results["results"]["grabcut"]["sa_photo"] == 3 and results["variants"]["sa_photo"] == faster
    sgd = variant_spec({**sa, "sequence": {"inputs": "states", "lr": 1.0e-4, "optimizer": "sgd"}}, adapt)
    results["variants"]["sa_photo"] = older
    assert forget_changed_variants(results, {"fixed": {}, "sa_photo": sgd})  # not the default: runs again
    assert "sa_photo" not in results["results"]["grabcut"]


def test_a_dataset_whose_data_changed_runs_again(capsys):
    from lightning_app.benchmark import dataset_identity, forget_changed_datasets

    source = {"dataset": "synthetic", "domain": "source", "length": 100, "seed": 2}
    roof = {"dataset": "synthetic", "domain": "rooftop", "length": 100, "seed": 2}
    now = {"source": dataset_identity(source, None), "rooftop": dataset_identity(roof, None)}
    assert now["rooftop"]["entry"]["style"] == {"facet_light": 0.9, "tile_lines": 0.3} and "style" not in now["source"]["entry"]
    old = {"data": {"test": [source, roof], "min_area": None},  # before identities were recorded: rooftop's old render
           "results": {"source": {"fixed": 1}, "rooftop": {"fixed": 2}}, "objects": {"source": {"fixed": 1}, "rooftop": {"fixed": 2}}}
    assert forget_changed_datasets(old, now)
    assert old["results"] == {"source": {"fixed": 1}} and old["objects"] == {"source": {"fixed": 1}}
    assert "rooftop: its data changed since it ran" in capsys.readouterr().out
    assert not forget_changed_datasets(old, now)  # recorded: nothing to do
    explicit = {"rooftop": dataset_identity({**roof, "style": {"facet_light": 0.9}}, None)}
    old["results"]["rooftop"] = {"fixed": 3}
    assert not forget_changed_datasets(old, explicit) and old["results"]["rooftop"] == {"fixed": 3}  # the same images
    assert forget_changed_datasets(old, {"rooftop": dataset_identity(roof, 100)})  # min_area picks other objects
    assert "rooftop" not in old["results"]


def test_variants_keep_the_configs_order_when_one_is_rerun():
    from lightning_app.benchmark import _in_order
    results = {"results": {"fundus": {"fixed": 1, "ia_sa": 2, "sa": 3}}, "objects": {"fundus": {"sa": 3, "fixed": 1, "old": 0}}}
    _in_order(results, ["fixed", "sa", "ia_sa"])
    assert list(results["results"]["fundus"]) == ["fixed", "sa", "ia_sa"]
    assert list(results["objects"]["fundus"]) == ["fixed", "sa", "old"]
    results["results"]["fundus"]["sa_norm"] = 4  # a variant added later, run alone, comes last
    assert not _in_order(results, ["sa_norm"]) and list(results["results"]["fundus"])[-1] == "sa_norm"
    assert _in_order(results, ["fixed", "sa_norm", "sa", "ia_sa"])  # the config that names it puts it in its place
    assert list(results["results"]["fundus"]) == ["fixed", "sa_norm", "sa", "ia_sa"]


def test_a_second_benchmark_on_the_same_folder_is_refused(tiny_ckpt, tmp_path):
    from lightning_app.benchmark import locked

    out = tmp_path / "bench"
    with locked(out):
        r = run_cli("benchmark", "--ckpt", str(tiny_ckpt), "--out_dir", str(out), *BENCH)
    assert r.returncode == 2 and "is in use by another benchmark" in r.stderr.strip().splitlines()[-1]


def test_print_config_is_complete():
    r = run_cli("fit", "--config", "configs/train_init.yaml", "--print_config")
    assert r.returncode == 0, r.stderr
    assert "backbone: resnet10t" in r.stdout and "click_radius: 3.0" in r.stdout and "max_steps: 1500" in r.stdout
    r = run_cli("benchmark", "--config", "configs/benchmark.yaml", "--print_config")
    assert r.returncode == 0, r.stderr
    assert "test:" in r.stdout and "max_clicks: 20" in r.stdout
    assert "- ia_sa" in r.stdout  # make benchmark compares the four variants
    r = run_cli("benchmark", "--config", "configs/benchmark.yaml", "--config", "configs/demo.yaml", "--print_config")
    assert r.returncode == 0, r.stderr
    assert "out_dir: runs/demo" in r.stdout and "length: 20" in r.stdout and "length: 50" not in r.stdout


@pytest.mark.parametrize(
    "args,expected",
    [
        (["benchmark", "--ckpt", "no/such.ckpt"], "checkpoint 'no/such.ckpt' does not exist"),
        (["benchmark", "--ckpt", "CORRUPT"], "cannot be loaded"),
        (["fit", "--config", "configs/train_init.yaml", "--model.backbone", "resnet_nope"], "unknown backbone 'resnet_nope'"),
        (["fit", "--config", "configs/train_init.yaml", "--model.no_such_key", "1"], "no_such_key"),
        (["benchmark", "--ckpt", "x.ckpt", "--variants", "[magic]"], "unknown variant 'magic'"),
        (["benchmark", "--ckpt", "RANDOM"], "not a PyTorch checkpoint"),
        (["benchmark", "--ckpt", "x.ckpt", "--max_click", "3"], "unrecognized arguments: --max_click"),
        (["fit", "--config", "configs/train_init.yaml", "--ckpt_path", "CORRUPT"], "is not a readable Lightning checkpoint"),
        (["fit", "--config", "configs/train_init.yaml", "--ckpt_path", "no/such.ckpt"], "--ckpt_path 'no/such.ckpt' does not exist"),
        (["fit", "--config", "configs/train_init.yaml", "--trainer.accelerator", "gpu"], "error:"),
        (["fit", "--config", "configs/train_init.yaml", "--trainer.devices", "0"], "error:"),
        (["fit", "--config", "configs/train_init.yaml", "--data.num_workers", "-1"], "data.num_workers=-1: expected at least 0"),
        (["fit", "--config", "configs/train_init.yaml", "--data.train", "[{dataset: synthetic, domain: source, length: 5}]"],
         "dataset 'synthetic' needs the key(s) ['seed']"),
        (["predict", "--config", "configs/train_init.yaml"], "unknown command 'predict'"),
        (["benchmark", "--ckpt", "STALE_MAS", "--out_dir", "OUT"], "cannot be read"),
        (["benchmark", "--config", "configs/benchmark.yaml", "--ckpt", "TINY", "--out_dir", "OUT", "--variants", "[fixed]",
          "--data.test", "[{dataset: synthetic, domain: fundus, length: 1, seed: 2, size: 32}]"],  # raised in a loader worker
         "domain 'fundus' (size 32) drew no object of at least min_area=1250 px"),
    ],
)
def test_bad_input_is_one_clear_line(args, expected, tmp_path, tiny_ckpt):
    bad = tmp_path / "corrupt.ckpt"
    bad.write_bytes(b"\x00garbage" * 10)
    noise = tmp_path / "random.ckpt"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    stale = tmp_path / "model.ckpt"  # a checkpoint whose MAS importance file is corrupt
    stale.write_bytes(tiny_ckpt.read_bytes())
    (tmp_path / "model.ckpt.mas.pt").write_bytes(b"junk")
    swap = {"CORRUPT": bad, "RANDOM": noise, "STALE_MAS": stale, "OUT": tmp_path / "out", "TINY": tiny_ckpt}
    r = run_cli(*[str(swap.get(a, a)) for a in args])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert expected in r.stderr.strip().splitlines()[-1]


def test_spread_gives_each_runs_numbers_and_their_spread(tmp_path):
    from modules.metrics import summarize

    protocol = {"max_clicks": 20, "iou_thresholds": [0.8, 0.9], "target_iou": 0.9, "paper_thresholds": {"fundus": 0.9}}
    curve = np.concatenate([np.linspace(0.5, 0.97, 6), np.full(20, 0.97)])
    def later(delay: int) -> dict:  # the same objects, reached a few clicks later
        return summarize(np.stack([np.concatenate([np.full(delay + j, 0.5), curve])[:20] for j in range(4)]), protocol["iou_thresholds"])

    runs = []
    for i, delay in enumerate([0, 2, 5]):  # one model per run
        out = tmp_path / f"bench{i}"
        out.mkdir()
        (out / "results.json").write_text(json.dumps({
            "protocol": protocol, "model": {"checkpoint": f"m{i}.ckpt", "sha256_16": str(i)},
            "data": {"test": ["source", "fundus"]}, "datasets": {"fundus": {"entry": "fundus", "min_area": 1250}},
            "results": {"source": {"fixed": later(0)},
                        "fundus": {"fixed": later(delay) | {"repeated_click_fraction": 0.1 * i}, "sa": later(delay // 2)}}}))
        runs.append(out)
    r = run_cli("spread", "--runs", "[" + ",".join(map(str, runs)) + "]", "--out_dir", str(tmp_path / "spread"))
    assert r.returncode == 0, r.stderr[-2000:]
    spread = json.loads((tmp_path / "spread" / "spread.json").read_text())
    each = [json.loads((run / "results.json").read_text())["results"]["fundus"] for run in runs]
    source = json.loads((runs[0] / "results.json").read_text())["results"]["source"]["fixed"]["noc"]["90"]
    fundus = spread["results"]["fundus"]
    cell = fundus["fixed"]["noc@90"]
    assert cell["runs"] == [e["fixed"]["noc"]["90"] for e in each] and len(set(cell["runs"])) == 3
    assert cell["mean"] == pytest.approx(np.mean(cell["runs"])) and cell["sd"] == pytest.approx(np.std(cell["runs"], ddof=1))
    assert (cell["min"], cell["max"]) == (min(cell["runs"]), max(cell["runs"]))
    # the targets' ratios, run by run: a variant against fixed, a target domain against the first dataset
    assert fundus["sa"]["noc@90 / fixed"]["runs"] == pytest.approx([e["sa"]["noc"]["90"] / e["fixed"]["noc"]["90"] for e in each])
    assert fundus["fixed"]["noc@90 / source"]["runs"] == pytest.approx([e["fixed"]["noc"]["90"] / source for e in each])
    assert fundus["fixed"]["repeat"]["runs"] == pytest.approx([0, 0.1, 0.2]) and "repeat" not in fundus["sa"]
    assert "noc@90 / source" not in spread["results"]["source"]["fixed"]
    text = (tmp_path / "spread" / "spread.md").read_text()
    assert "| fundus | fixed |" in text and "| fundus | sa | NoC@90 / fixed |" in text
    other, smaller = tmp_path / "other", tmp_path / "smaller"
    for folder, a, b in [(other, '"max_clicks": 20', '"max_clicks": 10'), (smaller, '"min_area": 1250', '"min_area": 64')]:
        folder.mkdir()
        (folder / "results.json").write_text((runs[0] / "results.json").read_text().replace(a, b))
    for bad, expected in [([runs[0], other], "its protocol or test data differ"), ([runs[0], smaller], "its protocol or test data differ"),
                          ([runs[0], tmp_path / "none"], "missing or not JSON"), ([runs[0]], "expected at least two")]:
        r = run_cli("spread", "--runs", "[" + ",".join(map(str, bad)) + "]", "--out_dir", str(tmp_path / "s2"))
        assert r.returncode == 2 and "Traceback" not in r.stderr and expected in r.stderr.strip().splitlines()[-1]


def test_top_level_help_lists_every_command():
    r = run_cli("--help")
    assert r.returncode == 0
    for command in ("fit", "benchmark", "importance", "evolve", "app", "app-benchmark", "images", "spread"):
        assert f"  {command} " in r.stdout


def test_resume_survives_a_kill_during_the_first_last_ckpt(tmp_path):
    """``--ckpt_path last`` with a half-written last.ckpt (a partial .tmp) and a step checkpoint:
    the newest step checkpoint is used and the partial file removed."""
    assert main(tiny_fit_args(tmp_path, steps=2)) == 0
    folder = tmp_path / "checkpoints"
    (folder / "last.ckpt").rename(folder / "step00002.ckpt")
    (folder / ".last.ckpt.abc.tmp").write_bytes(b"partial")
    assert main(tiny_fit_args(tmp_path, steps=4) + ["--ckpt_path", "last"]) == 0
    assert torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4
    assert not list(folder.glob(".*.tmp"))


@pytest.mark.slow
def test_sigterm_stops_fit_and_benchmark_with_a_non_zero_exit(tiny_ckpt, tmp_path):
    import signal
    import time

    env = dict(os.environ, WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    for args in (tiny_fit_args(tmp_path / "fit", steps=2000),
                 ["benchmark", "--ckpt", str(tiny_ckpt), "--out_dir", str(tmp_path / "bench"), "--max_clicks", "20",
                  "--data.test", f"[{synthetic('fundus', 5000)}]", "--data.num_workers", "0"]):  # more than 25 s of work on any machine
        proc = subprocess.Popen([sys.executable, "-m", "lightning_app", *args], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(25)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 143, err[-2000:]
        assert "terminated (SIGTERM)" in err


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])  # bf16: configs/train_bsds.yaml
def test_training_is_reproducible_and_resumes_exactly(tmp_path, precision):
    """The same config and seed give the same weights; a run stopped half-way and resumed ends
    where an uninterrupted one does."""
    def state(root):
        return torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]

    extra = ["--model.iterative_start", "0.0", "--model.prev_mask", "true", "--trainer.precision", precision]
    assert main(tiny_fit_args(tmp_path / "a", steps=4) + extra) == 0
    assert main(tiny_fit_args(tmp_path / "b", steps=4) + extra) == 0
    stop = json.dumps({"class_path": "conftest.StopAt", "init_args": {"step": 2}})
    assert main(tiny_fit_args(tmp_path / "c", steps=4) + extra + ["--trainer.val_check_interval", "2",
                                                                  "--trainer.callbacks+", stop]) == 0
    assert torch.load(tmp_path / "c" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert main(tiny_fit_args(tmp_path / "c", steps=4) + extra + ["--ckpt_path", str(tmp_path / "c/checkpoints/last.ckpt")]) == 0
    a, b, c = state(tmp_path / "a"), state(tmp_path / "b"), state(tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a), "same config and seed, different weights"
    assert all(torch.equal(a[k], c[k]) for k in a), "a resumed run differs from an uninterrupted one"


def test_images_writes_a_data_entrys_images(tmp_path):
    """`make app`'s first step: a data entry's images as PNG files."""
    r = run_cli("images", "--data", "{dataset: synthetic, domain: fundus, length: 2, seed: 7}", "--out_dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fundus_000.png", "fundus_001.png"]


def test_wandb_run_of_a_benchmark_logs_photos_of_different_sizes_quietly(tmp_path, monkeypatch, caplog):
    import logging
    from types import SimpleNamespace

    from lightning_app.benchmark import _log_to_wandb
    from modules.metrics import summarize

    monkeypatch.setenv("WANDB_MODE", "offline")
    sizes = [(40, 60), (50, 30), (32, 32)]
    samples = [SimpleNamespace(image=np.full((*s, 3), 90, np.uint8), mask=np.ones(s, bool)) for s in sizes]
    dataset = SimpleNamespace(name="photos", source=SimpleNamespace(get_sample=lambda i: samples[i]))
    records = [SimpleNamespace(name=f"photo{i}", ious=np.linspace(0.2, 0.5 + 0.1 * i, 5),
                               masks=lambda s=s: (np.zeros(s, bool), np.ones(s, bool))) for i, s in enumerate(sizes)]
    entry = summarize(np.stack([r.ious for r in records]), (0.8, 0.9), 5) | {
        "seconds_per_click": 0.01, "seconds_per_click_p95": 0.02, "repeated_click_fraction": 0.0,
        "repeated_user_click_fraction": 0.0, "adaptation_rollbacks": 0}
    with caplog.at_level(logging.WARNING):
        _log_to_wandb("test", "group", tmp_path, "fixed", dataset, records, entry, max_clicks=5)
    assert "do not match" not in caplog.text
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
    media = sorted(runs[0].rglob("media/images/worst_objects/*.png"))
    assert len(media) == 6, media  # the three worst objects, their first and last masks
