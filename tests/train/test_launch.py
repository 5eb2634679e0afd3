"""The command-line entry points: 2-process `torchrun launch/sft.py` with expert parallelism (its
log: no warning, no line twice), and launch/chat.py on the export it writes."""

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
    log = run.stdout + run.stderr
    assert "ep 2 (AutoEP)" in log
    # a first run of the demo warns about nothing (neither its own settings nor DeepSpeed's view
    # of the model's outputs) and says each thing once, not once per rank
    assert "warning" not in log.lower(), log
    said = [line for line in log.splitlines() if line.strip() and not line.lstrip().startswith("predicted")]
    assert len(said) == len(set(said)), [line for line in said if said.count(line) > 1]
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

