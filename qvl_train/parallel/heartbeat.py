"""Per-rank heartbeats, so a stall names the rank that stopped and what the others wait in.

Every rank keeps `<run>/heartbeat/rank_<r>.json` fresh from a daemon thread: its host and pid,
the step it is in and since when, the time of the write, and where its main thread is (the
innermost torch.distributed / DeepSpeed frame, e.g. `all_reduce`, and the qvl_train line that
called it). The thread runs while the main thread is blocked inside a gloo/NCCL collective (they
release the GIL), so a rank that waits for a peer stays fresh; a rank that is stopped (SIGSTOP, a
frozen node), dead, or hung in code that holds the GIL goes stale. Files in the run dir work
whatever state the peers are in (a store would die with the rank hosting it).

`report` reads every rank's file and says which ranks are behind (stale, exited, or not in the
collective the others wait in) and where the others wait; the stall watchdog
(parallel.watchdog.Watchdog) prints it when no step finished for train.stall_timeout_minutes, and
exit_on_error adds it to a collective timeout or a broken connection.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

STALE_INTERVALS = 3  # a heartbeat older than this many intervals: the rank is not running
_WRAPPERS = ("c10d_logger.py",)  # torch.distributed's logging decorators: not the collective itself
_OWN = ("/parallel/heartbeat.py", "/parallel/watchdog.py")


class Heartbeat:
    def __init__(self, run_dir: Path, *, rank: int, world_size: int, interval_s: float = 5.0) -> None:
        self.dir = Path(run_dir) / "heartbeat"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world_size, self.interval_s = rank, world_size, interval_s
        self.path = self.dir / f"rank_{rank:05d}.json"
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.step, self.step_started = 0, time.time()
        self._main = threading.main_thread().ident
        self._lock = threading.Lock()  # the loop (each step) and the watchdog thread both write
        self.write()

    def set_step(self, step: int) -> None:
        """The main thread starts `step` (1-based) now. Written at once (one small file per step),
        so a rank that freezes before the thread's next write still shows the step it froze in."""
        self.step, self.step_started = step, time.time()
        self.write()

    def write(self) -> None:
        record = {"rank": self.rank, "host": self.host, "pid": self.pid, "step": self.step,
                  "step_started": self.step_started, "time": time.time(), "where": main_thread_where(self._main)}
        with self._lock:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self.path)  # a reader never sees half a record

    def read_all(self) -> dict[int, dict]:
        found = {}
        for r in range(self.world_size):
            try:
                found[r] = json.loads((self.dir / f"rank_{r:05d}.json").read_text())
            except (OSError, ValueError):
                pass  # not started yet, or unreadable: reported as no heartbeat
        return found

    def report(self, *, others_only: bool = False) -> tuple[str, bool]:
        """(the ranks behind and where the others wait, whether any rank is behind); `others_only`
        leaves this rank out (its own error says where it is)."""
        now, records = time.time(), self.read_all()
        if others_only:
            records.pop(self.rank, None)
        stale_s = STALE_INTERVALS * self.interval_s
        behind, waiting = [], {}
        live_steps = [rec["step"] for rec in records.values() if _alive(rec, now, stale_s)]
        newest = max(live_steps, default=self.step)
        for r in range(self.world_size):
            if others_only and r == self.rank:
                continue
            rec = records.get(r)
            if rec is None:
                behind.append(f"rank {r}: no heartbeat file in {self.dir} (it never started?)")
                continue
            step_age = now - rec["step_started"]
            seen = f"last seen in step {rec['step']} (started {step_age:.0f} s ago), {rec['where']}"
            if _exited(rec):
                behind.append(f"rank {r} ({rec['host']}, pid {rec['pid']}): the process is gone; {seen}")
            elif not _alive(rec, now, stale_s):
                behind.append(f"rank {r} ({rec['host']}, pid {rec['pid']}): no heartbeat for {now - rec['time']:.0f} s "
                              f"(stopped, frozen, or hung in code that holds the GIL); {seen}")
            elif rec["step"] < newest or not rec["where"].startswith("in "):
                behind.append(f"rank {r} ({rec['host']}, pid {rec['pid']}): running but {rec['where']} in step "
                              f"{rec['step']} (started {step_age:.0f} s ago)")
            else:
                waiting.setdefault((rec["step"], rec["where"]), []).append(r)
        lines = [f"  behind: {b}" for b in behind]
        lines += [f"  waiting: {_ranks(rs)} {where} in step {step}" for (step, where), rs in sorted(waiting.items())]
        return "\n".join(lines), bool(behind)

    def first_live_rank(self) -> int:
        now, stale_s = time.time(), STALE_INTERVALS * self.interval_s
        live = [r for r, rec in self.read_all().items() if _alive(rec, now, stale_s) or r == self.rank]
        return min(live, default=self.rank)


def main_thread_where(ident: int | None = None) -> str:
    """'in all_reduce (torch/distributed/distributed_c10d.py:3012), called from qvl_train/train/trainer.py:340
    in _train_step', or 'not in a collective: in ...' for the main thread's current frame."""
    frame = sys._current_frames().get(ident or threading.main_thread().ident)
    while frame is not None and frame.f_code.co_filename.endswith(_OWN):  # called from the main thread itself
        frame = frame.f_back
    comm = ours = None
    innermost = frame
    while frame is not None:
        path = frame.f_code.co_filename
        if comm is None and _is_comm(frame):
            comm = frame
        if ours is None and "/qvl_train/" in path and not path.endswith(_OWN):
            ours = frame
        frame = frame.f_back
    if innermost is None:
        return "not in a collective: (no Python frame)"
    caller = f", called from {_where(ours)}" if ours is not None and comm is not None else ""
    if comm is not None:
        return f"in {comm.f_code.co_name} ({_where(comm, short=True)}){caller}"
    return f"not in a collective: in {_where(ours or innermost)}"


def _is_comm(frame) -> bool:
    """torch.distributed or DeepSpeed's comm layers, or ZeRO-3 waiting on an async all-gather."""
    path = frame.f_code.co_filename
    if "/torch/distributed/" in path:
        return not path.endswith(_WRAPPERS)
    return ("/deepspeed/comm/" in path or "/deepspeed/runtime/comm/" in path
            or ("/deepspeed/runtime/zero/" in path and frame.f_code.co_name == "wait"))


def _where(frame, short: bool = False) -> str:
    path = frame.f_code.co_filename
    for root in ("/qvl_train/", "/torch/", "/deepspeed/", "/tests/"):
        if root in path:
            path = root.strip("/") + "/" + path.split(root, 1)[1]
            break
    return f"{path}:{frame.f_lineno}" if short else f"{path}:{frame.f_lineno} in {frame.f_code.co_name}"


def _alive(rec: dict, now: float, stale_s: float) -> bool:
    return now - rec["time"] <= stale_s and not _exited(rec)


def _exited(rec: dict) -> bool:
    """Only decidable on this host (pids of other nodes mean nothing here)."""
    if rec["host"] != socket.gethostname():
        return False
    try:
        os.kill(rec["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    try:  # killed but not yet reaped by torchrun: a zombie (Linux)
        return Path(f"/proc/{rec['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _ranks(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> 'ranks 0-2, 5'."""
    spans, start = [], ranks[0]
    for a, b in zip(ranks, ranks[1:] + [None]):
        if b != a + 1:
            spans.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(spans)


_active: Heartbeat | None = None


def set_active(hb: Heartbeat | None) -> None:
    global _active
    _active = hb


def active_report() -> str | None:
    """The report of this process's heartbeat when some rank is behind (for exit_on_error), else None."""
    if _active is None:
        return None
    try:
        text, behind = _active.report(others_only=True)
    except Exception:  # on the error path: never mask the real error
        return None
    return text if behind else None
