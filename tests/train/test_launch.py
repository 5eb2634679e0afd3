"""The command-line entry points: 2-process `torchrun launch/sft.py` with expert parallelism, and
launch/chat.py on the export it writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_two_process_ep2_run_exports_a_checkpoint_and_chat_evaluates_it(tmp_path, capsys):
    from transformers import Qwen3VLMoeForConditionalGeneration

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "launch/sft.py"), "+recipe=vqa", "parallel.ep_size=2", "train.max_steps=3",
           "train.eval_max_batches=1", "train.generate_max_samples=4", "train.generate_max_new_tokens=2",
           "checkpoint.save_every=0", "logging.progress_bar=false", "logging.wandb.mode=disabled",
           f"output_dir={tmp_path}", "run_name=ep2"]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "ep 2 (AutoEP)" in run.stdout + run.stderr
    summary = json.loads((tmp_path / "ep2" / "summary.json").read_text())
    export = Path(summary["export_dir"])
    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(export)
    assert hf.config.text_config.num_experts == 8  # all experts gathered back from the 2 EP ranks

    sys.path.insert(0, str(REPO / "launch"))
    import chat

    lines = (REPO / "data/vqa_demo/eval.jsonl").read_text().splitlines()[:3]
    rows = []
    for line in lines:  # absolute media paths, so the JSONL can live anywhere
        sample = json.loads(line)
        for part in sample["messages"][0]["content"]:
            for key in ("image", "video"):
                if part.get("type") == key:
                    part[key] = str(REPO / "data/vqa_demo" / part[key])
        rows.append(json.dumps(sample))
    (tmp_path / "eval.jsonl").write_text("\n".join(rows))
    chat.main(["--model", str(export), "--eval", str(tmp_path / "eval.jsonl"), "--max-new-tokens", "3"])
    assert "exact match overall" in capsys.readouterr().out
    image = next(p for p in json.loads(lines[0])["messages"][0]["content"] if p["type"] == "image")["image"]
    chat.main(["--model", str(export), "--image", str(REPO / "data/vqa_demo" / image), "--max-new-tokens", "3",
               "What colour is the shape?"])
    assert capsys.readouterr().out.count("\n") == 1  # one answer line (maybe empty after 3 steps)


def test_real_checkpoint_loads_into_zero3_partitions_with_identical_training(tmp_path):
    """model.path under ZeRO-3 with 2 ranks builds under zero.Init and copies the checkpoint in
    tensor by tensor; training from it must match training the same weights built in memory."""
    from qvl_train.data import build_tiny_tokenizer, write_processor_configs
    from qvl_train.model import build_model, save_pretrained

    base = tmp_path / "base"
    save_pretrained(build_model("tiny", seed=0), base, max_shard_bytes=500_000)  # several shards
    build_tiny_tokenizer(base)
    write_processor_configs(base)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    losses = {}
    for name, extra in (("from_dir", [f"model.path={base}", "model.preset=null"]), ("in_memory", [])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "launch/sft.py"), "+recipe=vqa", "train.max_steps=3", "train.log_every=1",
               "train.generate_eval=false", "train.eval_max_batches=1", "checkpoint.save_every=0",
               "checkpoint.export_at_end=false", "logging.progress_bar=false", "logging.wandb.mode=disabled",
               f"output_dir={tmp_path}", f"run_name={name}", *extra]
        run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        assert ("ZeRO-3 partitions" in run.stdout) == (name == "from_dir")
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses["from_dir"]) == 3
    for a, b in zip(losses["from_dir"], losses["in_memory"]):
        assert abs(a - b) <= 1e-6 * abs(b), losses
