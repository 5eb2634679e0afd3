"""One rank of tests/faults/test_signals.py's 2-process torchrun job (each rank under
exit_code_wrapper.py, which records its exit status). Runs, one after another through the real
Trainer:

1. ZeRO-3, optim.lr=1e30: every rank skips the same non-finite steps and every rank stops at the
   same step (train.max_nonfinite_steps=2);
2. ZeRO-0, 1 and 2 in fp32, optim.lr=1e30: ZeRO-0 applies a non-finite update (no overflow
   check), so the trainer must stop at the first one; ZeRO-1/2 skip them as ZeRO-3 does;

writes OUT/rank_<r>.json with what each run did on this rank, then

3. a run that prints GRACE_MARKER after its step 2, when the test sends torchrun SIGUSR1
   (Slurm's --signal), which torchrun forwards to every rank: a preemption whose checkpoint write
   outlasts checkpoint.preempt_grace_s (2 s), so each rank must dump its stacks and exit 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from qvl_train.config import compose, to_config  # noqa: E402
from qvl_train.parallel.runtime import init_runtime  # noqa: E402
from qvl_train.train import faults  # noqa: E402
from qvl_train.train.faults import DivergenceError  # noqa: E402

GRACE_MARKER = "grace run: step 2 done"
QUICK = ["+recipe=vqa", "train.log_every=1", "train.generate_eval=false", "train.eval_max_batches=1",
         "logging.progress_bar=false", "logging.wandb.mode=disabled", "optim.warmup_steps=0", "data.num_workers=0",
         "checkpoint.export_at_end=false"]


def diverge(rt, out: Path, name: str, *extra: str) -> dict:
    from qvl_train.train.trainer import Trainer

    trainer = Trainer(to_config(compose([*QUICK, "optim.lr=1e30", f"output_dir={out}", f"run_name={name}", *extra])), rt)
    try:
        trainer.fit()
        error = None
    except DivergenceError as e:
        error = str(e)
    saved = sorted(p.name for p in (trainer.run_dir / "checkpoints").glob("step_*"))
    return {"error": error, "step": trainer.step, "nonfinite": trainer.divergence.nonfinite_total,
            "skipped": trainer.engine.skipped_steps, "checkpoints": saved}


def slow_checkpoint_write() -> None:
    time.sleep(120)  # outlasts the grace: the watchdog must end the process first


def main() -> None:
    out = Path(sys.argv[1].split("=", 1)[1])  # output_dir=DIR
    rt = init_runtime("gloo")
    from qvl_train.train.trainer import Trainer

    res = {}
    for stage in (3, 0, 1, 2):
        res[f"zero{stage}"] = diverge(rt, out, f"zero{stage}", f"parallel.zero_stage={stage}", "train.max_steps=6",
                                      "train.max_nonfinite_steps=2", "checkpoint.save_every=1")
    (out / f"rank_{rt.rank}.json").write_text(json.dumps(res))

    trainer = Trainer(to_config(compose([*QUICK, "train.max_steps=200", "checkpoint.preempt_grace_s=2",
                                         f"output_dir={out}", "run_name=grace"])), rt)
    trainer.save_checkpoint = slow_checkpoint_write
    inject = faults.inject

    def mark_step_2(step: int, rank: int) -> None:
        inject(step, rank)
        if step == 2 and rank == 0:
            print(GRACE_MARKER, flush=True)

    faults.inject = mark_step_2
    trainer.fit()
    print(f"[rank {rt.rank}] still running after the preemption grace (or no signal came)", file=sys.stderr, flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
