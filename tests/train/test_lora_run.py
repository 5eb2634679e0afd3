"""A short LoRA run of the demo recipe (ZeRO-3, one process) with non-default image budgets: the
adapter it writes loads with PEFT onto transformers' model built from the base, with the trained
model's logits, and it and its merge serve as trained with transformers alone.

The base is the `trained` fixture's export (tests/train/conftest.py), which knows its 8 held-out
questions, so the adapter's exact match is well above chance and transformers scoring the
adapter and the merge alike means something. (The LoRA run on the tiny preset, whose base the
run exports itself, is in test_matrix.py.)"""

import json
from pathlib import Path

import pytest
import torch

from qvl_train.config import compose, to_config

from . import serving_checks
from .conftest import memorize_overrides
from .demo import demo_image_batch


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, runtime, trained):
    """(trainer, summary, run dir, base dir)."""
    from qvl_train.train.trainer import Trainer

    base = trained[1]["export_dir"]
    out = tmp_path_factory.mktemp("runs")
    cfg = to_config(compose([
        "+recipe=vqa", f"model.path={base}", "model.preset=null", "peft=lora", "peft.router=true",
        "peft.export_attention_only=true", "optim.lr=2e-2", "optim.grad_accum=2",
        "train.max_steps=3", "train.eval_max_batches=1",
        f"output_dir={out}", "run_name=lora", "logging.progress_bar=false", "logging.wandb.mode=disabled",
        *memorize_overrides(out),
    ]))
    trainer = Trainer(cfg, runtime)
    summary = trainer.fit()
    yield trainer, summary, out / "lora", Path(base)


def _launch_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"launch_{name}", Path(__file__).resolve().parents[2] / f"launch/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_adapters_train(lora_run):
    trainer, *_ = lora_run
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("experts" in n for n in trainable) and any("mlp.gate" in n for n in trainable)


def test_adapter_loads_in_peft_with_the_trained_logits(lora_run):
    from peft import PeftModel
    from transformers import Qwen3VLMoeForConditionalGeneration

    trainer, summary, _, base_dir = lora_run
    adapter = Path(summary["export_dir"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == base_dir.resolve()
    assert (adapter / "attention_only" / "adapter_model.safetensors").exists()
    base = Qwen3VLMoeForConditionalGeneration.from_pretrained(config["base_model_name_or_path"], attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    batch, hf_extra = demo_image_batch(trainer.tokenizer, 3, trainer.model_cfg.image_token_id)
    trainer.model.eval()
    with torch.no_grad():
        ours = trainer.model(**batch).logits
        ref = peft_model(**batch, **hf_extra).logits
        untouched = Qwen3VLMoeForConditionalGeneration.from_pretrained(config["base_model_name_or_path"]).eval()
        plain = untouched(**batch, **hf_extra).logits  # (PeftModel wrapped `base` in place)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert (ours - plain).abs().max() > 1e-3  # the adapter really changed the model


def test_lora_checkpoint_converts_to_a_merged_hf_export(lora_run, tmp_path):
    import importlib.util

    from transformers import Qwen3VLMoeForConditionalGeneration

    trainer, _, run_dir, _ = lora_run
    spec = importlib.util.spec_from_file_location("export_cli", Path(__file__).resolve().parents[2] / "launch/export.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    out = cli.export(cli.parse_args(["--deepspeed-checkpoint", str(ckpt), "--out", str(tmp_path / "merged")]))
    merged = Qwen3VLMoeForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.tensor([[5, 17, 99, 230, 7]])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, trainer.model(ids).logits, atol=1e-4, rtol=0)


def test_lora_checkpoint_converts_to_the_runs_own_adapter(lora_run, tmp_path):
    """launch/export.py --checkpoint --adapter-only: the resharding checkpoint's LoRA tensors,
    read without DeepSpeed, are the adapter the run exported, exactly."""
    from safetensors.torch import load_file

    _, summary, run_dir, _ = lora_run
    cli = _launch_module("export")
    ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    out = cli.export(cli.parse_args(["--checkpoint", str(ckpt), "--adapter-only", "--out", str(tmp_path / "adapter")]))
    ours, theirs = load_file(out / "adapter_model.safetensors"), load_file(Path(summary["export_dir"]) / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16


def test_adapter_and_its_merge_serve_as_trained_with_transformers_alone(lora_run, tmp_path, capsys):
    from qvl_train.train import hf_eval

    trainer, summary, run_dir, base_dir = lora_run
    adapter = Path(summary["export_dir"])
    assert summary["eval/exact_match"] >= 5 / 8  # the base knew its questions: chance is about 30%
    serving_checks.assert_processor_files_match_training(adapter, trainer)
    assert "PeftModel.from_pretrained" in (adapter / "README.md").read_text()
    serving_checks.assert_transformers_sees_what_training_saw(adapter, trainer, hf_eval.load_model(adapter))
    serving_checks.assert_exact_match_within_one_sample(summary, summary)
    chat = _launch_module("chat")
    chat.main(["--model", str(adapter), "--eval", trainer.cfg.data.eval_datasets[0].path, "--backend", "transformers",
               "--max-new-tokens", str(trainer.cfg.train.generate_max_new_tokens)])
    right, total = capsys.readouterr().out.strip().splitlines()[-1].split()[0].split("/")
    assert int(total) == 8 and abs(int(right) - round(summary["eval/exact_match"] * 8)) <= 1

    cli = _launch_module("export")
    merged = cli.export(cli.parse_args(["--base", str(base_dir), "--adapter", str(adapter),
                                        "--out", str(tmp_path / "merged")]))
    serving_checks.assert_processor_files_match_training(merged, trainer, card_notes=False)
    hf = hf_eval.load_model(merged)
    serving_checks.assert_transformers_sees_what_training_saw(merged, trainer, hf)
    served = hf_eval.score(hf, hf_eval.load_processor(merged), hf_eval.eval_records(trainer.cfg.data, trainer.tokenizer),
                           max_new_tokens=trainer.cfg.train.generate_max_new_tokens)
    serving_checks.assert_exact_match_within_one_sample(summary, served.metrics())
    serving_checks.assert_generate_stops_at_im_end(merged, hf, trainer)
