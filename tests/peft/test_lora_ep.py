"""Expert LoRA with expert parallelism (ep 2, ZeRO-3, 2 CPU processes, gloo): the LoRA gradients
of every expert (and of attention and router) equal the single-process ones, and so do the
losses of a few steps. The worker is lora_ep_worker.py."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out_dir: Path, timeout: int = 300) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(Path(__file__).with_name("lora_ep_worker.py")), "--out", str(out_dir)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}:\n{tail}"
    assert (out_dir / "result.json").exists(), f"no result.json:\n{tail}"
    return json.loads((out_dir / "result.json").read_text())


def test_lora_ep2_zero3_gradient_parity(tmp_path):
    res = _run(tmp_path)
    grads = res["grads"]
    assert any(".mlp.experts.base_layer.lora_A." in n for n in grads)  # gate_up LoRA
    assert any(".mlp.experts.lora_B." in n for n in grads)  # down LoRA
    assert any(".mlp.gate.lora_A." in n for n in grads)  # router LoRA
    for name, (diff, scale) in grads.items():
        assert scale > 0, f"{name}: zero reference gradient"
        assert diff <= 1e-5 + 1e-4 * scale, f"{name}: |grad - ref| = {diff:.3g} (ref max {scale:.3g})"
    for got, want in zip(res["losses"], res["ref_losses"]):
        assert abs(got - want) <= 1e-4 * max(1.0, abs(want)), (res["losses"], res["ref_losses"])
