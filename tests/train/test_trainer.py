"""A short in-process run of the demo recipe (ZeRO-3, one process, gloo) with non-default image
budgets: metrics, W&B offline history, checkpoints, and an HF export that transformers alone (its
processor from the export's files, its model, its generate) serves as the run trained it.

The run (the `trained` fixture, tests/train/conftest.py) learns its 8 held-out image questions by
heart, so its exact match is well above chance and transformers scoring the export alike means
something: an untrained model scores 0 on both sides, which any broken export would match too."""

import json
from pathlib import Path

import pytest
import torch

from qvl_train.config import compose, to_config

from . import serving_checks
from .conftest import TRAINED_STEPS
from .demo import demo_image_batch
from .wandb_reader import history

STEPS = TRAINED_STEPS


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_cover_loss_aux_throughput_and_experts(trained):
    _, summary, run_dir = trained
    rows = {r["step"]: r for r in _metrics(run_dir) if "train/loss" in r}
    assert sorted(rows) == list(range(1, STEPS + 1))
    for r in rows.values():
        assert r["train/aux"] > 0 and abs(r["train/loss"] - r["train/ce"] - 0.01 * r["train/aux"]) < 1e-4
        for key in ("perf/tokens_per_s", "perf/samples_per_s", "data/packing_efficiency", "train/grad_norm",
                    "lr/llm", "sys/peak_memory_gib", "perf/data_wait_fraction", "experts/cv_mean", "experts/dead_total", "experts/max_load",
                    "experts/min_load", "experts_by_layer/layer_00/cv", "experts_by_layer/layer_00/max_load"):
            assert key in r, key
    assert any("eval/loss" in r for r in _metrics(run_dir))
    assert 0.0 <= summary["eval/exact_match"] <= 1.0 and summary["eval/loss"] > 0
    assert (run_dir / "config.yaml").exists() and (run_dir / "summary.json").exists()


def test_wandb_offline_history_reads_back(trained):
    _, _, run_dir = trained
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    rows = history(files[0])
    losses = {s: h["train/loss"] for s, h in rows.items() if "train/loss" in h}
    expected = {r["step"]: r["train/loss"] for r in _metrics(run_dir) if "train/loss" in r}
    assert losses.keys() == expected.keys()
    assert all(abs(losses[s] - expected[s]) < 1e-9 for s in expected)
    assert any(k.startswith("experts/load_heatmap") for h in rows.values() for k in h)  # an image
    assert any("eval/exact_match" in h for h in rows.values())


def test_checkpoints_are_complete_and_rotated(trained):
    _, _, run_dir = trained
    ckpts = sorted(p for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert [c.name for c in ckpts] == [f"step_{STEPS:08d}"]
    assert (ckpts[0] / "COMPLETE").exists() and (ckpts[0] / "rank_0.pt").exists()


def test_export_loads_in_transformers_with_the_trained_logits(trained):
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLMoeForConditionalGeneration

    trainer, summary, run_dir = trained
    export = Path(summary["export_dir"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (export / name).exists(), name
    # (AutoProcessor would also build the video processor, which needs torchvision: not installed here)
    assert AutoTokenizer.from_pretrained(export).chat_template
    assert AutoImageProcessor.from_pretrained(export).patch_size == 16
    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(export, attn_implementation="eager").eval()
    batch, hf_extra = demo_image_batch(trainer.tokenizer, 0, trainer.model_cfg.image_token_id)
    trainer.model.eval()
    with torch.no_grad():
        ours = trainer.model(**batch).logits
        ref = hf(**batch, **hf_extra).logits
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def _export_cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_cli", Path(__file__).resolve().parents[2] / "launch/export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_checkpoint_exports_to_the_same_hf_weights_as_the_run(trained, tmp_path):
    from qvl_train.model import from_pretrained

    _, summary, run_dir = trained
    ckpt = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    out = _export_cli().export(_export_cli().parse_args(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]))
    assert (out / "tokenizer.json").exists() and (out / "preprocessor_config.json").exists()
    converted, exported = from_pretrained(out), from_pretrained(summary["export_dir"])
    for (name, a), (_, b) in zip(converted.state_dict().items(), exported.state_dict().items()):
        assert torch.equal(a, b), name


def test_export_serves_as_trained_with_transformers_alone(trained):
    from qvl_train.train import hf_eval

    trainer, summary, _ = trained
    export = Path(summary["export_dir"])
    serving_checks.assert_processor_files_match_training(export, trainer)
    hf = hf_eval.load_model(export)
    serving_checks.assert_transformers_sees_what_training_saw(export, trainer, hf)
    assert summary["eval/exact_match"] >= 5 / 8  # it learned its questions: chance is about 30%
    serving_checks.assert_exact_match_within_one_sample(summary, summary)
    serving_checks.assert_generate_stops_at_im_end(export, hf, trainer)


def test_ep_size_that_divides_neither_world_nor_experts_stops_before_any_work(tmp_path, runtime):
    from qvl_train.train.trainer import Trainer

    cfg = to_config(compose(["+recipe=vqa", "parallel.ep_size=3", f"output_dir={tmp_path}", "run_name=bad"]))
    with pytest.raises(ValueError, match=r"world size 1 and the number of experts 8\. Set parallel\.ep_size to one of \[1\]"):
        Trainer(cfg, runtime)
    assert not (tmp_path / "bad").exists()  # no run dir, tokenizer or weights yet
