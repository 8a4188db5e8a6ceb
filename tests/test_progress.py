import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.demos.boring_classes import BoringModel

from callbacks.checkpoint import RunCheckpoint, RunEnvironment
from callbacks.progress import ProgressLog
from modules.environment import environment
from modules.errors import UserError


def test_progress_log_is_quiet_and_knows_the_end_of_an_epoch_based_run(capsys):
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=5, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ProgressLog(every=3600, force=True)])
    trainer.fit(BoringModel())
    lines = capsys.readouterr().out.strip().splitlines()
    progress = [line for line in lines if line.startswith("step ")]
    assert f"training from step 0 to 10 ({torch.get_num_threads()} CPU threads)" in lines
    assert len(progress) == 2 and progress[-1].startswith("step 10/10")  # the first step and the last, not every step


def test_a_checkpoint_keeps_its_environment_and_a_resume_elsewhere_says_what_differs(tmp_path, capsys):
    trainer = pl.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[RunEnvironment()])
    trainer.fit(BoringModel())
    ckpt = torch.load(next((tmp_path / "checkpoints").glob("*.ckpt")), weights_only=False)
    saved = ckpt["callbacks"]["RunEnvironment"]
    assert saved == environment() and saved["cpu_threads"] == torch.get_num_threads()
    assert saved["torch"] == torch.__version__.split("+")[0] and saved["cpu"]
    RunEnvironment().load_state_dict(saved)
    assert "note:" not in capsys.readouterr().out  # the same environment: nothing to say
    RunEnvironment().load_state_dict({**saved, "cpu_threads": torch.get_num_threads() + 1, "opencv-python-headless": "4.14.0.94"})
    out = capsys.readouterr().out
    assert f"OMP_NUM_THREADS={torch.get_num_threads() + 1}" in out and "opencv-python-headless 4.14.0.94 ->" in out
    assert len(out.strip().splitlines()) == 1
    RunEnvironment().load_state_dict({"cpu_threads": torch.get_num_threads()})  # an older checkpoint kept only the threads
    assert "note:" not in capsys.readouterr().out


def test_the_end_of_training_is_checkpointed_when_the_length_is_no_multiple_of_the_interval(tmp_path):
    trainer = pl.Trainer(max_steps=5, limit_val_batches=0, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[RunCheckpoint(every_n_train_steps=2)])
    trainer.fit(BoringModel())
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.glob("step*.ckpt")) == ["step00002.ckpt", "step00004.ckpt", "step00005.ckpt"]
    last = torch.load(folder / "last.ckpt", weights_only=False)
    assert last["global_step"] == 5  # not step 4's weights
    assert all(torch.equal(v, trainer.lightning_module.state_dict()[k]) for k, v in last["state_dict"].items())


def test_keep_leaves_only_the_latest_step_checkpoints(tmp_path):
    trainer = pl.Trainer(max_steps=5, limit_val_batches=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[RunCheckpoint(every_n_train_steps=1, keep=2)])
    trainer.fit(BoringModel())
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.glob("*.ckpt")) == ["last.ckpt", "step00004.ckpt", "step00005.ckpt"]
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == 5
    with pytest.raises(UserError, match="keep=0"):
        RunCheckpoint(keep=0)
