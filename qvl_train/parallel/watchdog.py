"""Process-level fault handling: one failing rank ends the job, preemption signals end it with a
checkpoint, a stalled job dumps its stacks and exits. (docs/reliability.md has the whole table.)

- `exit_on_error`: the exception path of launch/sft.py. It prints the error and leaves with
  os._exit: no barrier, no collective, no destructor that could wait for a peer. The rank that
  fails first (a counter in the c10d store, which lives in torchrun's agent) prints the full
  traceback headed by its rank and records it for torchrun's summary; ranks that fail after it
  (their collective broke because the first one left) print one line. torchrun sees a non-zero
  exit and SIGTERMs the others; a rank stuck inside a C++ collective that ignores SIGTERM is
  SIGKILLed after torchrun's --shutdown-timeout (30 s by default).
- `Watchdog`: faulthandler's timer. It runs on a C thread, so it fires even while the main thread
  is blocked in a collective holding the GIL: it dumps every thread's Python stack to stderr and
  calls _exit(1). Re-armed at every step (stall timeout) or set once to the preemption grace.
  With a heartbeat (parallel.heartbeat) a daemon thread keeps this rank's heartbeat file fresh and,
  at the stall timeout, prints which ranks are behind and what the others wait in; the stacks and
  the exit follow REPORT_GRACE_S later.
- `Preemption`: SIGTERM (what Slurm and torchrun send) and SIGUSR1 (Slurm's --signal) only set a
  flag; the step loop all-reduces it once per step (MAX of one float), so every rank stops after
  the same step, writes the checkpoint and exits with PREEMPTED_EXIT_CODE; a node whose torchrun
  was not signalled has it signalled then, so that `--max-restarts` does not restart it
  (parallel/elastic.py).
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from . import elastic
from . import heartbeat as hb

PREEMPTED_EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: stopped on request with a checkpoint; run again to resume
FAILED_EXIT_CODE = 1
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REPORT_GRACE_S = 3.0  # from the stall report to the stack dumps and exit


class Preempted(Exception):
    """Raised by the trainer after the preemption checkpoint; launch/sft.py exits with PREEMPTED_EXIT_CODE."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")
        self.step, self.signum = step, signum


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _claim_first_failure() -> bool:
    """True for the first rank of the job to fail (counter in the c10d store; True without one)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=5))
        return store.add("qvl_train/failed_ranks", 1) == 1
    except Exception:  # no process group yet, or the store is gone: print everything
        return True


def _record_for_torchrun(exc: BaseException) -> None:
    """torchrun prints this file in its "Root Cause" summary (what @record would write). Written
    whole then renamed: once a peer has died torchrun SIGTERMs this rank, possibly mid-write, and
    parses the file; a half-written one crashed torchrun itself (JSONDecodeError), ending a job
    that `--max-restarts` should have restarted."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(f"{path}.tmp", "w") as f:
            json.dump({"message": {"message": f"{type(exc).__name__}: {exc}",
                                   "extraInfo": {"py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))}}}, f)
        os.replace(f"{path}.tmp", path)
    except OSError:
        pass


def exit_on_error(exc: BaseException) -> None:
    """Print the error (in full if this rank failed first) and leave now, without any collective."""
    rank = _rank()
    first = _claim_first_failure()
    if first:
        tb = "".join(traceback.format_exception(exc))
        sys.stderr.write(f"\n[rank {rank}] FAILED: {type(exc).__name__}: {exc}\n{tb}\n")
        behind = hb.active_report()  # a collective timeout or a lost peer: name the ranks that stopped
        if behind:
            sys.stderr.write(f"[rank {rank}] the ranks' heartbeats when this failed:\n{behind}\n")
        _record_for_torchrun(exc)
    else:
        sys.stderr.write(f"[rank {rank}] stopping because another rank failed first (its error is above): "
                         f"{type(exc).__name__}: {str(exc)[:300]}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(FAILED_EXIT_CODE)


class Watchdog:
    """Stall detector and preemption deadline on faulthandler's single timer; with a heartbeat,
    also the stall report (see the module docstring)."""

    def __init__(self, stall_minutes: float, heartbeat: hb.Heartbeat | None = None) -> None:
        self.stall_s = stall_minutes * 60
        self.deadline_set = False
        self.heartbeat = heartbeat
        self._armed_at: float | None = None  # monotonic time of the last beat while the stall countdown runs
        self._reported = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_failed = False

    @classmethod
    def with_heartbeat(cls, stall_minutes: float, run_dir: Path, *, rank: int, world_size: int) -> Watchdog:
        """Heartbeats every 5 s (or 1/6 of a short stall timeout, so a stale rank shows before it)."""
        interval = min(5.0, stall_minutes * 60 / 6) if stall_minutes > 0 else 5.0
        return cls(stall_minutes, hb.Heartbeat(run_dir, rank=rank, world_size=world_size, interval_s=interval))

    def beat(self, step: int | None = None) -> None:
        """Step `step` starts: restart the stall countdown (no-op once a hard deadline is set)."""
        if self.heartbeat is not None and step is not None:
            self.heartbeat.set_step(step)
        if self.heartbeat is not None and self._thread is None:  # started with the loop, stopped by stop()
            hb.set_active(self.heartbeat)
            self._thread = threading.Thread(target=self._monitor, name="qvl-heartbeat", daemon=True)
            self._thread.start()
        if self.stall_s > 0 and not self.deadline_set:
            self._armed_at, self._reported = time.monotonic(), False
            grace = REPORT_GRACE_S if self.heartbeat is not None else 0.0
            faulthandler.dump_traceback_later(self.stall_s + grace, exit=True, file=sys.__stderr__)

    def pause(self) -> None:
        """Before work with no step bound (final eval, export): stop the stall countdown."""
        if not self.deadline_set:
            self._armed_at = None
            faulthandler.cancel_dump_traceback_later()

    def set_deadline(self, seconds: float) -> None:
        """Exit with stacks after `seconds` whatever happens (the preemption grace)."""
        self.deadline_set, self._armed_at = True, None
        faulthandler.dump_traceback_later(max(seconds, 1.0), exit=True, file=sys.__stderr__)

    def stop(self) -> None:
        self.deadline_set, self._armed_at = False, None
        self._stop.set()  # the heartbeat stays registered: exit_on_error, which runs after this, reads it
        faulthandler.cancel_dump_traceback_later()

    def _monitor(self) -> None:
        """Heartbeat thread: write every interval; report once when the stall countdown runs out."""
        interval = self.heartbeat.interval_s
        while True:
            armed = self._armed_at
            wait = interval
            if armed is not None and not self._reported:
                wait = min(wait, max(0.0, armed + self.stall_s - time.monotonic()))
            if self._stop.wait(wait):
                return
            try:
                self.heartbeat.write()
                armed = self._armed_at
                if armed is not None and not self._reported and time.monotonic() - armed >= self.stall_s:
                    self._reported = True
                    sys.__stderr__.write(self._stall_message() + "\n")
                    sys.__stderr__.flush()
            except Exception as e:  # a full or vanished run dir must not kill the thread silently
                if not self._write_failed:
                    self._write_failed = True
                    sys.__stderr__.write(f"[rank {self.heartbeat.rank}] heartbeat: {type(e).__name__}: {e}\n")

    def _stall_message(self) -> str:
        h = self.heartbeat
        head = (f"[rank {h.rank}] STALLED: no training step finished for {self.stall_s:.0f} s "
                f"(train.stall_timeout_minutes={self.stall_s / 60:g}) in step {h.step}")
        first = h.first_live_rank()
        if first != h.rank:
            return f"{head}, {hb.main_thread_where()}; rank {first} reports which ranks are behind."
        text, _ = h.report()
        return (f"{head}. From the ranks' heartbeats ({h.dir}):\n{text}\n"
                f"Every rank dumps its Python stacks and exits 1 in {REPORT_GRACE_S:.0f} s.")


class Preemption:
    """SIGTERM / SIGUSR1 -> a flag; `agreed()` tells every rank the same answer each step."""

    def __init__(self, grace_s: float, watchdog: Watchdog) -> None:
        self.grace_s, self.watchdog = grace_s, watchdog
        self.signum: int | None = None
        self.received_at: float | None = None
        self.signals_received = 0  # by this process itself (the others' reach it through agreed())
        self.stopping = False  # agreed() returned a signal: the trainer checkpoints and exits 75
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        """Restores the previous handlers, except after a stop: the process exits 75 next, and a
        signal torchrun forwards meanwhile (its own, late) must not kill it on the way out."""
        if not self.stopping:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        self.signals_received += 1
        if self.signum is None:  # no printing here: the handler may interrupt a write to stderr
            self.signum, self.received_at = signum, time.monotonic()
            self.watchdog.set_deadline(self.grace_s)

    def agreed(self, device: torch.device) -> int | None:
        """The signal if any rank got one (collective: call it on every rank at the same point)."""
        flag = torch.tensor([float(self.signum or 0)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        got = int(flag.item())
        if got and self.signum is None:  # another rank's signal: the grace starts now here too
            self.signum, self.received_at = got, time.monotonic()
            self.watchdog.set_deadline(self.grace_s)
        self.stopping = bool(got)
        return got or None

    def keep_torchrun_from_restarting(self) -> None:
        """Collective, after the stop's checkpoint: a node whose torchrun was not signalled and
        would restart its workers (--max-restarts) gets it signalled (parallel/elastic.py)."""
        elastic.end_unsignalled_torchrun(signum=self.signum, signalled_here=self.signals_received > 0,
                                         signals_received=lambda: self.signals_received)
