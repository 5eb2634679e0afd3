"""The trainer prints the memory plan at start and refuses a run that cannot fit before any work."""

import pytest

from qvl_train.config import compose, to_config


def test_trainer_refuses_a_run_that_cannot_fit_before_building_the_model(tmp_path, runtime, monkeypatch, capsys):
    from qvl_train.train import trainer as trainer_mod

    built = []
    monkeypatch.setattr(trainer_mod, "build_train_model", lambda *args, **kwargs: built.append(args))
    cfg = to_config(compose(["+recipe=vqa", "plan.gpu_mem_gib=0.001", f"output_dir={tmp_path}", "run_name=r",
                             "logging.wandb.mode=disabled", "logging.progress_bar=false"]))
    with pytest.raises(ValueError, match=r"memory plan needs .* GiB per rank but the device has 0.0 GiB"):
        trainer_mod.Trainer(cfg, runtime)
    assert not built
    assert "memory plan per rank (CPU: host RAM), world size 1" in capsys.readouterr().out
