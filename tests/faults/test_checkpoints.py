"""Checkpoint integrity on checkpoint directories built by hand (the 2-process test in
test_ranks.py does the same on DeepSpeed's own files): a write that never finished, a truncated
file and same-size garbage are skipped by resume=auto with the file named, refused when asked for
by path, and our rank files load with weights_only=True."""

import pickle

import numpy as np
import pytest
import torch

from qvl_train.checkpoint import manifest
from qvl_train.checkpoint.state import MARKER, load_rank_state, resolve_resume, rng_state, set_rng_state, tag_for


def _checkpoint(root, step: int):
    d = root / tag_for(step)
    d.mkdir(parents=True)
    (d / "optim_states.pt").write_bytes(bytes(range(256)) * 64)
    torch.save({"step": step, "rng": rng_state()}, d / "rank_0.pt")
    manifest.write(d, exclude=(MARKER,))
    (d / MARKER).write_text(str(step))
    return d


def test_resume_auto_skips_torn_truncated_and_garbled_checkpoints(tmp_path):
    good, garbled, truncated = _checkpoint(tmp_path, 2), _checkpoint(tmp_path, 4), _checkpoint(tmp_path, 6)
    torn = tmp_path / tag_for(8)  # killed mid-write: files, no marker
    torn.mkdir()
    (torn / "rank_0.pt").write_bytes(b"partial")
    with open(garbled / "optim_states.pt", "r+b") as f:
        f.seek(1000)
        f.write(b"\xff" * 4096)
    (truncated / "rank_0.pt").write_bytes((truncated / "rank_0.pt").read_bytes()[:50])
    warnings = []
    assert resolve_resume("auto", tmp_path, warn=warnings.append) == good
    assert f"{truncated / 'rank_0.pt'}: 50 bytes" in warnings[0]
    assert f"{garbled / 'optim_states.pt'}: checksum" in warnings[1]
    assert len(warnings) == 2
    with pytest.raises(ValueError, match=f"{garbled / 'optim_states.pt'}: checksum"):
        resolve_resume(str(garbled), tmp_path)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(torn), tmp_path)
    assert resolve_resume(str(good), tmp_path) == good and resolve_resume("none", tmp_path) is None


def test_rank_state_round_trips_with_weights_only_and_refuses_pickled_objects(tmp_path):
    np.random.seed(3)
    torch.save({"step": 5, "rng": rng_state(), "loader": {"shards": [{"epoch": 0}]}}, tmp_path / "rank_0.pt")
    expected = np.random.rand(3)
    np.random.seed(99)
    set_rng_state(load_rank_state(tmp_path / "rank_0.pt")["rng"])
    assert np.array_equal(np.random.rand(3), expected)

    class Sneaky:
        def __reduce__(self):
            return (print, ("code ran while loading",))

    torch.save({"rng": Sneaky()}, tmp_path / "rank_1.pt", pickle_module=pickle)
    with pytest.raises(ValueError, match="rank_1.pt: cannot be loaded"):
        load_rank_state(tmp_path / "rank_1.pt")
