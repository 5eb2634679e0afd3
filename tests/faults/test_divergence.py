"""Divergence in short in-process runs of the demo recipe (one process, ZeRO-3): a learning rate
that blows up skips the non-finite updates, stops with the step and the batch's samples named,
and writes no checkpoint or export of the broken weights; a dead model is reported."""

import math

import pytest

from qvl_train.config import compose, to_config
from qvl_train.train.faults import DivergenceError

from .launch import rows

QUICK = ["+recipe=vqa", "train.log_every=1", "train.generate_eval=false", "train.eval_max_batches=1",
         "logging.progress_bar=false", "logging.wandb.mode=disabled", "optim.warmup_steps=0"]


def _trainer(runtime, out, name, *extra):
    from qvl_train.train.trainer import Trainer

    return Trainer(to_config(compose([*QUICK, f"output_dir={out}", f"run_name={name}", *extra])), runtime)


def test_exploding_lr_skips_nonfinite_updates_then_stops_naming_step_and_samples(tmp_path, runtime):
    trainer = _trainer(runtime, tmp_path, "boom", "optim.lr=1e30", "train.max_steps=8", "train.max_nonfinite_steps=2",
                       "checkpoint.save_every=1", "checkpoint.export_every=1")
    with pytest.raises(DivergenceError) as e:
        trainer.fit()
    steps = {r["step"]: r for r in rows(tmp_path / "boom") if "train/loss" in r}
    bad = [s for s, r in steps.items() if not math.isfinite(r["train/loss"])]
    assert bad and bad == list(range(bad[0], bad[0] + 2)), steps  # two in a row, then the stop
    assert f"2 non-finite steps in a row, the last at step {bad[-1]}" in str(e.value)
    assert "train.jsonl:" in str(e.value)  # the batch's samples as file:line
    assert [steps[s]["train/nonfinite_steps"] for s in bad] == [1, 2]
    assert trainer.engine.skipped_steps == 2  # DeepSpeed discarded both updates
    saved = sorted(p.name for p in (tmp_path / "boom" / "checkpoints").glob("step_*"))
    exported = sorted(p.name for p in (tmp_path / "boom" / "exports").glob("step_*"))
    last_good = f"step_{bad[0] - 1:08d}"
    assert saved[-1] <= last_good and exported[-1] <= last_good
    assert not (tmp_path / "boom" / "export").exists()


def test_a_dead_model_is_reported(tmp_path, runtime, capsys):
    trainer = _trainer(runtime, tmp_path, "dead", "optim.lr=1e4", "train.max_steps=6", "train.dead_model_steps=3",
                       "checkpoint.export_at_end=false")
    trainer.fit()
    assert "the model looks dead" in capsys.readouterr().out
