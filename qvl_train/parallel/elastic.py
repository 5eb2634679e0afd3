"""After a preemption stop, end every node's torchrun instead of letting one restart its workers.

torch 2.13's elastic agent (torch/distributed/elastic/agent/server/api.py, `_invoke_run`) reads
any non-zero worker exit, 75 included, as a failure: with `--max-restarts N` it restarts that
node's workers, which then wait in the rendezvous for the nodes that stopped until the join
timeout (600 s by default). The agent has no exit code for "stopped on purpose, do not restart".
What it does support is a signal: any of `--signals-to-handle` raises SignalException in its
main loop (`run()`), and it forwards the signal to its workers, waits `--shutdown-timeout` for
them and exits, with no restart. A node whose torchrun got the preemption signal ends that way;
on a node whose torchrun did not (the signal reached one node only, or went to a worker
directly), local rank 0 sends its torchrun the same signal before any worker of the job exits.

Which node was signalled: torchrun forwards its signal to every worker of its node, so a node's
torchrun was signalled when every one of its workers received the signal itself (all-gathered
once, at the stop). Which process is torchrun: each worker starts in a session of its own
(SubprocessHandler: start_new_session, so that killpg reaches the worker's children), so
torchrun is the parent of this process's session leader (the worker itself, or a wrapper
between torchrun and it); its command line must name torchrun and it must catch the signal.
The forwarded signal coming back to local rank 0 confirms that torchrun is shutting down.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

ACK_TIMEOUT_S = 10.0  # torchrun forwards the signal within its monitor interval (0.1 s)
TORCHRUN_MODULES = ("torch.distributed.run", "torch.distributed.launch")


def every_local_rank_signalled(signalled_here: bool) -> bool:
    """Whether every worker of this node received a preemption signal itself (collective when a
    process group is up: all-gathers (node, flag); GROUP_RANK is torchrun's node rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return signalled_here
    node = os.environ.get("GROUP_RANK", "0")
    seen: list = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (node, signalled_here))
    return all(flag for n, flag in seen if n == node)


def restarts_left() -> int:
    """How many more times this node's torchrun would restart failed workers (0 outside torchrun)."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" not in env:
        return 0
    return int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) - int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))


def torchrun_pid() -> tuple[int | None, str]:
    """(pid of the torchrun agent that started this worker, "") or (None, why not) (Linux /proc)."""
    try:
        leader, pid = os.getsid(0), os.getpid()
        while pid != leader:  # the session leader is this process or one of its ancestors
            pid = _status(pid)["PPid"]
            if pid <= 1:
                return None, f"this worker's session leader (pid {leader}) is not one of its ancestors"
        agent = _status(leader)["PPid"]
        argv = Path(f"/proc/{agent}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (OSError, KeyError, ValueError) as e:
        return None, f"cannot read the process tree ({type(e).__name__}: {e})"
    names = {os.path.basename(a) for a in argv[:2]} | set(argv[1:3])
    if "torchrun" not in names and not names & set(TORCHRUN_MODULES):
        return None, f"the parent of this worker's session (pid {agent}) is not torchrun: {' '.join(argv)[:200]}"
    return agent, ""


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (SigCgt in /proc/PID/status)."""
    try:
        return bool(_status(pid)["SigCgt"] >> (sig - 1) & 1)
    except (OSError, KeyError, ValueError):
        return False


def end_unsignalled_torchrun(*, signum: int, signalled_here: bool, signals_received: Callable[[], int]) -> None:
    """Collective, after the preemption checkpoint and before the workers exit: local rank 0 of a
    node whose torchrun would restart the workers and was not signalled sends it `signum` (or
    SIGTERM if it does not catch that one) and waits for torchrun to forward it back (counted
    by `signals_received`), so that it shuts down before any worker exits."""
    at_gather = signals_received()
    if every_local_rank_signalled(signalled_here) or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    left = restarts_left()
    if left <= 0:  # it will not restart: it ends by itself when the workers exit
        return
    rank = os.environ.get("RANK", "0")
    agent, why = torchrun_pid()
    sig = next((s for s in (signum, signal.SIGTERM) if agent is not None and catches(agent, s)), None)
    if agent is None or sig is None:
        why = why or f"torchrun (pid {agent}) catches neither {signal.Signals(signum).name} nor SIGTERM"
        _say(f"[rank {rank}] this node's torchrun was not signalled and may restart the workers of this preempted "
             f"run ({left} restart(s) left): {why}")
        return
    if signals_received() != at_gather:  # signalled since: torchrun is shutting down already
        return
    _say(f"[rank {rank}] this node's torchrun (pid {agent}) was not signalled and would restart the workers "
         f"({left} restart(s) left): sending it {signal.Signals(sig).name} so that it ends like a signalled node")
    os.kill(agent, sig)
    deadline = time.monotonic() + ACK_TIMEOUT_S
    while signals_received() == at_gather and time.monotonic() < deadline:
        time.sleep(0.05)  # the handler runs when the signal interrupts the sleep
    if signals_received() == at_gather:
        _say(f"[rank {rank}] torchrun (pid {agent}) did not forward {signal.Signals(sig).name} to the workers "
             f"within {ACK_TIMEOUT_S:.0f} s; it may restart them")


def _status(pid: int) -> dict[str, int]:
    """PPid (decimal) and SigCgt (hex) from /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("PPid", "SigCgt"):
            fields[key] = int(value.strip(), 16 if key == "SigCgt" else 10)
    return fields


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
