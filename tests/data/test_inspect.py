"""The inspect CLI on the bundled demo set and on a file with bad records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qvl_train.data import inspect as data_inspect

DEMO = Path(__file__).resolve().parents[2] / "data" / "vqa_demo"


def test_inspect_reports_demo_stats_and_renders_label_mask(capsys):
    assert data_inspect.main([str(DEMO / "eval.jsonl"), "--data-config", "vqa_demo", "--max-length", "48"]) == 0
    out = capsys.readouterr().out
    n = sum(1 for line in open(DEMO / "eval.jsonl") if line.strip())
    assert f"== eval: {n} samples, {n} encode, 0 bad" in out
    assert "visual tokens" in out and "length histogram" in out
    assert (
        "longer than max_length=48 (truncated" in out and "is left): 16" in out
    )  # the 16 video samples are 54-55 tokens
    assert "[[" in out and "<|im_end|>]]" in out  # the answer and its <|im_end|> are trained
    assert "<|image_pad|>x" in out or "<|video_pad|>x" in out


def test_inspect_counts_bad_records_with_file_and_line(tmp_path, capsys):
    shutil.copytree(DEMO / "images", tmp_path / "images")
    good = (DEMO / "train.jsonl").read_text().splitlines()[0]
    bad = [
        good,
        json.dumps(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "image": "images/missing.png"}, {"type": "text", "text": "q"}],
                    },
                    {"role": "assistant", "content": "a"},
                ]
            }
        ),
        "{not json",
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(bad) + "\n")
    data_inspect.main([str(path), "--data-config", "vqa_demo"])
    out = capsys.readouterr().out
    assert "== mixed: 4 samples, 1 encode, 3 bad" in out
    assert f"bad[missing_media] x1, first: {path}:2" in out
    assert f"{path}:3" in out and "bad[bad_json]" in out
    assert f"bad[no_assistant_turn] x1, first: {path}:4" in out


def test_inspect_runs_as_a_module():
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "qvl_train.data.inspect",
            str(DEMO / "video_eval.jsonl"),
            "--data-config",
            "video_demo",
            "--limit",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "video_eval: 3 samples, 3 encode, 0 bad" in r.stdout and "seconds>" in r.stdout
