import os

import pytest

TRAINED_STEPS = 30


@pytest.fixture(scope="session")
def runtime():
    """One single-process gloo group for every in-process trainer test: DeepSpeed caches its
    groups on the world group, so it must not be torn down and created again in one process."""
    from qvl_train.parallel.runtime import init_runtime, shutdown

    env = dict(os.environ)
    rt = init_runtime("gloo")
    yield rt
    shutdown()
    os.environ.clear()
    os.environ.update(env)


def memorize_overrides(out) -> list[str]:
    """Train on the 8 held-out image questions that serving_overrides(out) evaluates (written
    there by it), so a short run learns them by heart: exact match well above chance (~30%)."""
    from .demo import serving_overrides

    serving = serving_overrides(out)
    return ["train.generate_max_new_tokens=4", "optim.warmup_steps=0", "data.tokens_per_batch=512",
            f"data.datasets=[{{path: {out / 'image_eval.jsonl'}, name: held_out}}]", *serving]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, runtime):
    """The demo recipe in this process (ZeRO-3, one rank), learning its 8 held-out image
    questions (30 steps at lr 3e-2: 6 of 8 right measured), with its checkpoints, W&B offline
    history and HF export. test_trainer.py checks the run; test_lora_run.py trains LoRA on its export."""
    from qvl_train.config import compose, to_config
    from qvl_train.train.trainer import Trainer

    out = tmp_path_factory.mktemp("runs")
    steps = TRAINED_STEPS
    cfg = to_config(compose([
        "+recipe=vqa", f"train.max_steps={steps}", "train.log_every=1", f"train.eval_every={steps // 2}",
        "train.eval_max_batches=1", "optim.lr=3e-2", f"checkpoint.save_every={steps // 2}", "checkpoint.keep_last=1",
        f"output_dir={out}", "run_name=r", "logging.progress_bar=false", f"logging.expert_heatmap_every={steps // 2}",
        *memorize_overrides(out),
    ]))
    trainer = Trainer(cfg, runtime)
    summary = trainer.fit()
    yield trainer, summary, out / "r"
