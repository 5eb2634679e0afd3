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


TEXT = json.dumps({"messages": [{"role": "user", "content": "Say a."}, {"role": "assistant", "content": "a"}]})
IMAGE = json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "image": "x.png"},
                                                                {"type": "text", "text": "Colour?"}]},
                                 {"role": "assistant", "content": "red"}]})
NO_ANSWER = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})


def _line(n: int) -> str:
    """1-based line n: bad_json when n % 50 == 8, no answer when n % 100 == 14 (3% bad), a small
    image 1 in 500, else a short text conversation (cheap to encode)."""
    return "{not json" if n % 50 == 8 else NO_ANSWER if n % 100 == 14 else IMAGE if n % 500 == 3 else TEXT


def _mixed_file(path: Path, num_lines: int) -> int:
    """Writes the file (and its image); returns the number of bad lines."""
    from PIL import Image

    Image.new("RGB", (128, 128), "red").save(path.parent / "x.png")
    lines = [_line(n) for n in range(1, num_lines + 1)]
    path.write_text("\n".join(lines) + "\n")
    return sum(line in ("{not json", NO_ANSWER) for line in lines)


def _bad_rate_interval(out: str) -> tuple[float, float]:
    import re

    m = re.search(r"  bad: \d+ in the sample: [\d.]+% \(95% CI ([\d.]+)-([\d.]+)%\)", out)
    assert m, out
    return float(m.group(1)) / 100, float(m.group(2)) / 100


def test_default_report_on_200k_lines_encodes_only_its_sample_and_its_interval_holds_the_true_rate(
        tmp_path, capsys, monkeypatch):
    """The 200k-line file's exact rate is known by construction (the next test shows that --all
    reports exactly that); an --all pass here would encode 200k records (~2 min)."""
    from qvl_train.data.loader import SampleEncoder

    path = tmp_path / "big.jsonl"
    num_bad = _mixed_file(path, 200_000)
    encoded = tmp_path / "encoded"  # one byte per encode, appended by every worker process
    encode = SampleEncoder.__call__

    def counting(self, raw):
        with open(encoded, "ab") as f:
            f.write(b".")
        return encode(self, raw)

    monkeypatch.setattr(SampleEncoder, "__call__", counting)
    assert data_inspect.main([str(path), "--workers", "2"]) == 0
    out, err = capsys.readouterr()
    sample = data_inspect.DEFAULT_SAMPLE
    assert "== big: 200,000 records; ESTIMATED from a random sample of 10,000" in out
    sampled_bad_json = int(out.split("bad[bad_json] ")[1].split()[0])
    assert encoded.stat().st_size == sample - sampled_bad_json  # bad_json lines fail before the encoder
    assert f"{sample:,} records encoded in" in out and "by 2 processes" in out
    assert f"{sample}/{sample}" in err and "encoding a random sample (seed 0)" in err  # the progress bar
    lo, hi = _bad_rate_interval(out)
    assert lo < num_bad / 200_000 < hi and hi - lo < 0.01
    line = int(out.split("bad[no_assistant_turn]")[1].split("first in the sample: ")[1].split(":")[1])
    assert line % 100 == 14  # listed with file:line


def test_all_is_exact_in_parallel_and_a_sample_of_the_same_file_brackets_it(tmp_path, capsys):
    path = tmp_path / "small.jsonl"
    num_bad = _mixed_file(path, 4000)
    assert data_inspect.main([str(path), "--all", "--workers", "2", "--show", "-1"]) == 0
    out = capsys.readouterr().out
    assert f"== small: 4000 samples, {4000 - num_bad} encode, {num_bad} bad" in out and "by 2 processes" in out
    assert f"bad[bad_json] x{num_bad * 2 // 3}, first: [bad_json] {path}:8:" in out
    assert f"bad[no_assistant_turn] x{num_bad // 3}, first: {path}:14:" in out
    assert data_inspect.main([str(path), "--sample", "1000", "--workers", "1", "--show", "-1"]) == 0
    lo, hi = _bad_rate_interval(capsys.readouterr().out)
    assert lo < num_bad / 4000 < hi
