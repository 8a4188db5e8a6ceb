import pytorch_lightning as pl
from pytorch_lightning.demos.boring_classes import BoringModel

from callbacks.progress import ProgressLog


def test_progress_log_is_quiet_and_knows_the_end_of_an_epoch_based_run(capsys):
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=5, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ProgressLog(every=3600, force=True)])
    trainer.fit(BoringModel())
    lines = capsys.readouterr().out.strip().splitlines()
    progress = [line for line in lines if line.startswith("step ")]
    assert "training from step 0 to 10" in lines
    assert len(progress) == 2 and progress[-1].startswith("step 10/10")  # the first step and the last, not every step
