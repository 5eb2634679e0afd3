"""Rank-0 logging: a console progress bar and Weights & Biases (offline by default, so a fresh
machine needs no account or network; `logging.wandb.mode=online` streams to dashboards)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from qvl_train.config.schema import LoggingSection
from qvl_train.train import expert_chart


class RunLogger:
    def __init__(self, cfg: LoggingSection, *, run_dir: Path, config: dict, total_steps: int, start_step: int,
                 enabled: bool) -> None:
        self.cfg, self.enabled, self.run, self.run_dir = cfg, enabled, None, run_dir
        self.bar = None
        self.wandb_after = -1  # steps up to here are already in the W&B run (resume: not sent twice)
        if not enabled:
            return
        if start_step > 0:
            self.wandb_after = _drop_replayed_rows(run_dir / "metrics.jsonl", start_step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")  # plain-text history beside W&B's
        if cfg.wandb.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.name or run_dir.name,
                tags=list(cfg.wandb.tags), dir=str(run_dir), mode=cfg.wandb.mode, config=config,
                id=_run_id(run_dir), resume="allow",
            )
            _define_expert_metrics(self.run)
        if cfg.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        self._write(metrics, step)
        if self.run is not None and step > self.wandb_after:
            self.run.log(metrics, step=step)
        line = " ".join(f"{k.split('/')[-1]} {_fmt(v)}" for k, v in metrics.items() if k in _CONSOLE_KEYS)
        if self.bar is not None:
            self.bar.set_postfix_str(line)
        else:
            print(f"step {step}: {line}", flush=True)

    def log_summary(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        self._write(metrics, step)
        if self.run is not None:
            self.run.log(metrics, step=step)

    def _write(self, metrics: dict, step: int) -> None:
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log_expert_heatmap(self, load_LE: torch.Tensor, step: int) -> None:
        """The expert-load chart (qvl_train.train.expert_chart) to W&B, and the latest chart and
        its counts to <run dir>/expert_load.png and .json (readable without W&B)."""
        if not self.enabled:
            return
        from PIL import Image

        png = expert_chart.render_png(expert_chart.expert_load_figure(load_LE.numpy(), step))
        _replace(self.run_dir / "expert_load.png", png)
        _replace(self.run_dir / "expert_load.json", json.dumps({"step": step, "load": load_LE.tolist()}).encode())
        if self.run is not None:
            import wandb

            image = wandb.Image(Image.open(io.BytesIO(png)), caption=f"step {step}: load / uniform share per MoE layer and expert")
            self.run.log({"experts/load_heatmap": image}, step=step)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def finish(self, summary: dict | None = None, *, preempted: bool = False) -> None:
        if not self.enabled:
            return
        if preempted and self.run is not None:
            self.run.mark_preempting()
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.run is not None:
            if summary:
                self.run.summary.update(summary)
            self.run.finish()


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _define_expert_metrics(run) -> None:
    """The run summary keeps the worst expert balance seen, not the last (W&B's default)."""
    for key, worst in (("experts/max_load", "max"), ("experts/min_load", "min"), ("experts/dead_total", "max"),
                       ("experts/cv_max", "max")):
        run.define_metric(key, summary=worst)


_CONSOLE_KEYS = ("train/loss", "train/ce", "train/aux", "train/grad_norm", "perf/tokens_per_s", "eval/loss")


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"


def _drop_replayed_rows(path: Path, start_step: int) -> int:
    """A resume replays the steps after its checkpoint: drop their old rows from metrics.jsonl so
    each step appears once. Returns the last step logged before (W&B already holds the steps up to
    it and keeps its history monotonic, so those are not sent again)."""
    if not path.exists():
        return start_step
    kept, last = [], start_step
    for line in path.read_text().splitlines():
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a row torn by the kill
        last = max(last, step)
        if step <= start_step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)
    return last


def _run_id(run_dir: Path) -> str:
    # one W&B run per run dir, so a resumed run continues the same history
    return "".join(c if c.isalnum() else "-" for c in run_dir.resolve().name)[-64:] or "run"
