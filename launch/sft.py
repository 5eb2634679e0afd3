"""Supervised fine-tuning of Qwen3-VL-MoE.

    torchrun launch/sft.py +recipe=vqa                        # the bundled demo, CPU or GPU
    torchrun --nproc_per_node 8 launch/sft.py +recipe=30b_a3b_lora model.path=/models/Qwen3-VL-30B-A3B-Instruct

Any config key can be overridden as key=value (see configs/ and recipes/); typos are rejected.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import warnings  # noqa: E402

import hydra  # noqa: E402

# DeepSpeed 0.19 calls torch.distributed functions torch 2.13 renamed: one warning per step
warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\..*", category=FutureWarning)

from qvl_train.config import CONFIG_DIR, register, to_config  # noqa: E402

register()


@hydra.main(config_path=str(CONFIG_DIR), config_name="sft", version_base=None)
def main(dict_cfg) -> None:
    import faulthandler

    from qvl_train.parallel.runtime import init_runtime, shutdown
    from qvl_train.parallel.watchdog import PREEMPTED_EXIT_CODE, Preempted, exit_on_error

    faulthandler.enable()  # a segfault or abort in C++ still shows the Python stacks
    code = 0
    try:
        cfg = to_config(dict_cfg)
        rt = init_runtime(cfg.parallel.backend, cfg.parallel.timeout_minutes)
        from hydra.core.hydra_config import HydraConfig

        from qvl_train.train.trainer import Trainer

        Trainer(cfg, rt, overrides=list(HydraConfig.get().overrides.task)).fit()
    except Preempted as e:  # the checkpoint is written; every rank agreed to stop
        print(f"[rank {os.environ.get('RANK', '0')}] {e}; exiting with {PREEMPTED_EXIT_CODE}", file=sys.stderr, flush=True)
        code = PREEMPTED_EXIT_CODE
    except BaseException as e:  # one rank's error ends the job now: no barrier, no collective
        exit_on_error(e)
    shutdown()
    # Done and torn down: leave without running C++ static destructors. Seen once in CI on this
    # stack (deepspeed 0.19.8 CPU shm comm, gloo): "terminate called without an active
    # exception" (SIGABRT) at interpreter exit after a complete run, turning success into failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
