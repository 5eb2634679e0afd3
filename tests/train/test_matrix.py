"""Every combination trains under ZeRO-3: {LoRA, full} x {ep 1, 1 < ep < world, ep = world} x
{tiny preset, model.path}, on 4 CPU processes (one torchrun launch; matrix_worker.py runs the 12
runs one after another through the real Trainer, 2 steps each, ending with its export).

model.path is a checkpoint written by transformers itself (Qwen3VLMoeForConditionalGeneration
.save_pretrained, sharded with an index, transformers-5 expert layout), not by our writer.

Checked here, per run:
- the export loads in transformers (full) or in PEFT on transformers' base (LoRA) with the
  trained model's logits on a held-out demo batch;
- the checkpoint holds the tiny preset's initial weights, so the first step's loss (before any
  update; LoRA B starts at zero) is the same for all 12 runs: each rank's expert slice (LoRA
  ep > 1: read with get_slice; full ep > 1: AutoEP, experts read after initialize) holds the
  right experts; and full SFT from the checkpoint trains exactly as from the same weights in
  memory (the logits after the step agree);
- every run changes every trainable parameter (each rank's partition / expert slice before and
  after training) and no frozen one (LoRA's base); each LoRA export changes the base model's
  logits and its expert LoRA tensors are non-zero (B starts at zero: a step that missed the
  experts would leave them so);
- every trainable parameter is stepped by exactly one optimizer group with its part's learning
  rate, and weight decay exactly on the >= 2-D non-norm tensors, also AutoEP's replaced experts
  and router and parameters loaded straight into ZeRO-3 partitions.
"""

import json
from pathlib import Path

import pytest
import torch

from tests.parallel.launch import run_torchrun

from .demo import demo_image_batch
from .matrix_worker import LR, MERGER_LR, STEPS, VISION_LR, WEIGHT_DECAY

WORLD = 4
COMBOS = [(method, ep, source) for source in ("preset", "path") for method in ("lora", "full") for ep in (1, 2, 4)]


def _hf_written_checkpoint(path: Path) -> None:
    """transformers' model holding the tiny preset's initial weights (build_model seed 0, as the
    trainer builds them), written by its own save_pretrained."""
    from qvl_train.data import build_tiny_tokenizer, write_processor_configs
    from qvl_train.model import build_model
    from tests.model.reference import hf_twin, tiny_config

    hf_twin(build_model(tiny_config(), seed=0)).save_pretrained(path, max_shard_size="300KB")
    assert (path / "model.safetensors.index.json").exists() and len(list(path.glob("*.safetensors"))) > 2
    build_tiny_tokenizer(path)
    write_processor_configs(path)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    root = tmp_path_factory.mktemp("matrix")
    base = root / "base"
    _hf_written_checkpoint(base)
    out = root / "runs"
    out.mkdir()
    combos = ",".join(f"{m}:{ep}:{s}" for m, ep, s in COMBOS)
    results = run_torchrun(Path(__file__).with_name("matrix_worker.py"), ["--base", str(base), "--combos", combos],
                           out, nproc=WORLD, timeout=900)
    return base, out, results


def _first_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["train/loss"] for r in rows if r.get("step") == 1 and "train/loss" in r)


def test_every_combination_trains_and_starts_from_the_same_weights(matrix):
    _, out, results = matrix
    assert sorted(results) == sorted(f"{m}_ep{ep}_{s}" for m, ep, s in COMBOS)
    for name, res in results.items():
        assert res["steps"] == STEPS, name
        assert res["autoep"] == (name.startswith("full") and "_ep1_" not in name), name
    first = {n: _first_loss(out / n) for n in results}
    ref = first["full_ep1_preset"]
    assert all(abs(v - ref) <= 1e-5 * abs(ref) for v in first.values()), first


def test_full_sft_from_the_checkpoint_trains_like_from_the_same_weights_in_memory(matrix):
    """Same weights, data and seeds: loading into ZeRO-3 partitions (ep 1) or into AutoEP's
    expert slices after initialize (ep 2, 4) must not change what one step does."""
    _, out, _ = matrix
    for ep in (1, 2, 4):
        from_dir = torch.load(out / f"full_ep{ep}_path.logits.pt")
        in_memory = torch.load(out / f"full_ep{ep}_preset.logits.pt")
        torch.testing.assert_close(from_dir, in_memory, atol=1e-5, rtol=0)


def test_every_run_changes_its_trainable_weights_and_no_frozen_one(matrix):
    _, _, results = matrix
    for name, res in results.items():
        changes = res["changes"]
        trainable = [n for n, c in changes.items() if c["trainable"]]
        frozen = [n for n, c in changes.items() if not c["trainable"]]
        assert trainable, name
        assert [n for n in trainable if not changes[n]["changed"]] == [], name
        assert [n for n in frozen if changes[n]["changed"]] == [], name
        if name.startswith("lora"):  # the base is frozen (sharded experts' slices are buffers)
            assert all("lora_" in n for n in trainable) and any(".experts." in n for n in trainable), name
            assert any(".self_attn." in n for n in frozen) and any(n.startswith("model.visual.") for n in frozen), name
        else:
            assert frozen == [], name


def test_every_trainable_parameter_is_in_one_group_with_its_lr_and_decay(matrix):
    _, _, results = matrix
    for name, res in results.items():
        rows = res["groups"]["rows"]
        assert rows and res["groups"]["stale"] == 0, name
        if res["autoep"]:  # the replaced layers' parameters are there
            assert any(".mlp.experts.w1" in r["name"] for r in rows) and any(".mlp.router.gate." in r["name"] for r in rows)
        for r in rows:
            n = r["name"]
            assert len(r["groups"]) == 1, (name, r)
            lr = VISION_LR if n.startswith("model.visual.") else LR
            if n.startswith(("model.visual.merger", "model.visual.deepstack_merger_list")):
                lr = MERGER_LR
            decay = WEIGHT_DECAY if r["ndim"] >= 2 and "norm" not in n else 0.0
            assert (r["lrs"][0], r["decay"][0]) == (lr, decay), (name, r)


def _hf_model(path):
    from transformers import Qwen3VLMoeForConditionalGeneration

    return Qwen3VLMoeForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()


def test_exports_load_in_transformers_and_peft_with_the_trained_logits(matrix):
    from peft import PeftModel

    from qvl_train.data import load_tokenizer
    from qvl_train.model import load_config

    from safetensors.torch import load_file

    base, out, results = matrix
    tokenizer = load_tokenizer(base)
    batch, hf_extra = demo_image_batch(tokenizer, 3, load_config(base).image_token_id)
    plain: dict[str, torch.Tensor] = {}  # base dir -> the untrained base's logits
    for name, res in results.items():
        export = Path(res["export_dir"])
        if name.startswith("lora"):
            assert (export / "adapter_model.safetensors").exists(), name
            cfg = json.loads((export / "adapter_config.json").read_text())
            base_dir = cfg["base_model_name_or_path"]
            assert Path(base_dir) == Path(res["base_dir"]).resolve()
            experts = {k: v for k, v in load_file(export / "adapter_model.safetensors").items() if ".experts." in k}
            assert experts and all(v.abs().max() > 0 for v in experts.values()), (name, sorted(experts))
            if base_dir not in plain:
                with torch.no_grad():
                    plain[base_dir] = _hf_model(base_dir)(**batch, **hf_extra).logits
            model = PeftModel.from_pretrained(_hf_model(base_dir), export).eval()
        else:
            model = _hf_model(export)
        with torch.no_grad():
            ref = model(**batch, **hf_extra).logits
        ours = torch.load(out / f"{name}.logits.pt")
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
        if name.startswith("lora"):  # the adapter changes what the base predicts
            assert (ref - plain[base_dir]).abs().max() > 1e-3, name
