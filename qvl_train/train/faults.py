"""Training-loop fault handling: divergence (non-finite steps, a dead model), weights checked
before they are saved, bad-sample counts summed over ranks, and test-only fault injection.

Skipping a non-finite update: DeepSpeed's ZeRO-3 optimizer already discards a step whose global
gradient norm is inf/NaN (its overflow path: gradients zeroed, no optimizer or LR-scheduler
step, `engine.skipped_steps` += 1), and the norm is all-reduced, so every rank skips alike. The
trainer only has to notice it (the loss and norm it logs are global), count it, and stop after
`train.max_nonfinite_steps` in a row. ZeRO-1/2 skip alike (in fp32 too); where DeepSpeed would
apply the update anyway (ZeRO-0 has no overflow check) the guard stops at once instead of
training on NaN weights (tests/faults/test_signals.py).
"""

from __future__ import annotations

import math
import os
import signal

import torch
import torch.distributed as dist


class DivergenceError(RuntimeError):
    pass


class DivergenceGuard:
    """Per-step verdicts from the global loss and gradient norm (same values on every rank)."""

    def __init__(self, *, max_nonfinite_steps: int, dead_model_steps: int, vocab_size: int) -> None:
        self.max_nonfinite = max_nonfinite_steps
        self.dead_steps = dead_model_steps
        self.uniform_loss = math.log(vocab_size)
        self.nonfinite_total = 0
        self.consecutive = 0
        self.dead_since: int | None = None
        self.dead_warned = False

    @property
    def healthy(self) -> bool:
        """The last step was finite: the weights are worth saving."""
        return self.consecutive == 0

    def observe(self, *, step: int, grad_norm: float | None, loss: float | None = None) -> tuple[bool, str | None]:
        """(this step was non-finite, a warning to print once or None). `loss` is given on the
        steps whose metrics are read back (the average since the last read-back)."""
        finite = (grad_norm is None or math.isfinite(grad_norm)) and (loss is None or math.isfinite(loss))
        self.consecutive = 0 if finite else self.consecutive + 1
        self.nonfinite_total += not finite
        if loss is None:
            return not finite, None
        warning = None
        stuck = finite and grad_norm is not None and grad_norm < 1e-8 and abs(loss - self.uniform_loss) < 0.01 * self.uniform_loss
        if not stuck:
            self.dead_since, self.dead_warned = None, False
            return not finite, None
        if self.dead_since is None:
            self.dead_since = step
        if self.dead_steps and not self.dead_warned and step - self.dead_since + 1 >= self.dead_steps:
            self.dead_warned = True
            warning = (
                f"WARNING: the model looks dead: the loss has been ln(vocab_size) = {self.uniform_loss:.3f} "
                f"(uniform predictions) with a zero gradient norm for {step - self.dead_since + 1} steps since step "
                f"{self.dead_since}. The learning rate is probably far too high (optim.lr): it is not learning."
            )
        return not finite, warning

    def should_stop(self) -> bool:
        return self.max_nonfinite > 0 and self.consecutive >= self.max_nonfinite

    def stop_message(self, step: int, loss: float, grad_norm: float | None, sources: list[str]) -> str:
        shown = ", ".join(sources[:16]) + (f" (+{len(sources) - 16} more)" if len(sources) > 16 else "")
        return (
            f"training diverged: {self.consecutive} non-finite steps in a row, the last at step {step} "
            f"(loss {loss}, grad norm {grad_norm}; train.max_nonfinite_steps={self.max_nonfinite}). Each such update "
            f"was skipped and no checkpoint or export holds these weights. The last batch's samples: {shown or '?'}. "
            "Lower optim.lr (or raise optim.warmup_steps), or check these samples."
        )


def all_sources(local: list[str]) -> list[str]:
    """Every rank's sample locations of the current step (collective; only called on the way out)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(local)
    gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, list(local))
    return [s for part in gathered for s in part]


def weights_finite(model: torch.nn.Module, device: torch.device) -> bool:
    """All ranks' parameter shards are finite (collective). Under ZeRO-3 a rank checks its own
    partition (`ds_tensor`), so nothing is gathered."""
    bad = 0.0
    for p in model.parameters():
        t = getattr(p, "ds_tensor", None)
        t = p.data if t is None else t
        if t.numel() and not bool(torch.isfinite(t).all()):
            bad = 1.0
            break
    flag = torch.tensor([bad], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


def global_skip_counts(local: dict[str, int]) -> dict[str, int]:
    """Bad samples skipped so far, by reason, summed over ranks (collective)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, dict(local))
    else:
        gathered = [dict(local)]
    total: dict[str, int] = {}
    for counts in gathered:
        for reason, n in counts.items():
            total[reason] = total.get(reason, 0) + int(n)
    return {f"data/skipped/{k}": v for k, v in sorted(total.items())}


def inject(step: int, rank: int) -> None:
    """Test-only faults after `step` (tests/faults): QVL_FAULT_AFTER_STEP=N dies like SIGKILL;
    QVL_FAULT_SIGKILL_RANK_AT_STEP=R:N SIGKILLs rank R after step N in torchrun's first attempt
    only (TORCHELASTIC_RESTART_COUNT 0), so the restarted workers run on;
    QVL_FAULT_SIGTERM_LAUNCHER_AT_STEP=N makes local rank 0 send SIGTERM to its torchrun, as Slurm
    would (its parent, or QVL_FAULT_LAUNCHER_PID where a test wrapper sits between them; with two
    torchrun agents as two "nodes", set it for one of them only)."""
    if os.environ.get("QVL_FAULT_AFTER_STEP") == str(step):
        os._exit(137)
    if (os.environ.get("QVL_FAULT_SIGKILL_RANK_AT_STEP") == f"{rank}:{step}"
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("QVL_FAULT_SIGTERM_LAUNCHER_AT_STEP") == str(step) and os.environ.get("LOCAL_RANK", "0") == "0":
        os.kill(int(os.environ.get("QVL_FAULT_LAUNCHER_PID") or os.getppid()), signal.SIGTERM)
