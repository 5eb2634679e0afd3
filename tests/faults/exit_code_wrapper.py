"""torchrun entry point for the fault tests that check how workers exit: runs `python SCRIPT
ARGS...` as its child, waits for it and writes the child's exit status, as waitpid reports it to
its parent, to OUT/rank_<RANK>.exit (negative: killed by that signal), then exits with it.

torchrun signals each worker's whole process group (os.killpg), so the child gets SIGTERM /
SIGUSR1 straight from torchrun; this wrapper only has to survive them. The child is told
torchrun's pid (QVL_FAULT_LAUNCHER_PID), so the "SIGTERM the launcher" fault still reaches
torchrun and not this wrapper. Standard library only: it adds no import time.

    python -m torch.distributed.run ... tests/faults/exit_code_wrapper.py OUT launch/sft.py ARGS...
"""

import os
import signal
import subprocess
import sys
from pathlib import Path


def main() -> None:
    out, script, *args = sys.argv[1:]
    env = {**os.environ, "QVL_FAULT_LAUNCHER_PID": str(os.getppid())}
    child = subprocess.Popen([sys.executable, script, *args], env=env)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)  # the child got it too (same process group)
    code = child.wait()
    Path(out, f"rank_{os.environ['RANK']}.exit").write_text(str(code))
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
