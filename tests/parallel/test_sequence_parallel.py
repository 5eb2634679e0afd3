"""Sequence parallelism (qvl_train/parallel/sequence.py) is exact against one rank.

One 2-process launch (sp_worker.py, fp32, gloo) runs every check; the tests below judge parts of
its result. The packed batch holds images, a video whose frame groups land on both ranks,
text-only documents, documents crossing the split point, and padding (row length 63, padded to
64 for sp 2). Tolerances: 1e-5 relative (seen: losses ~1e-7, gradients <= 6e-7 in the norm of
each parameter's gradient).
"""

import pytest

from qvl_train.config.schema import RootConfig, validate
from qvl_train.parallel.sequence import sp_group_ranks, validate_sp_size

from .launch import run_torchrun

TOL = 1e-5


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_torchrun("sp_worker.py", [], tmp_path_factory.mktemp("sp"), nproc=2)


def test_ulysses_attention_matches_unsplit_attention(result):
    """KV heads split over the ranks (K=2) and replicated (K=1 < sp=2); outputs and q/k/v grads."""
    for K in (2, 1):
        assert result[f"ulysses_K{K}_out"] < TOL
        assert result[f"ulysses_K{K}_grads"] < TOL


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sp2_matches_one_rank(result, mode):
    r = result[mode]
    assert r["visual_tokens_per_rank"][1] > 0 and r["visual_tokens_per_rank"][0] > 0
    assert r["n_global"] == r["n_ref"]  # supervised tokens counted once per row
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=TOL)
    assert r["ce"] == pytest.approx(r["ref_ce"], rel=TOL)
    for aux in r["aux"]:  # every SP rank reports the whole row's aux loss
        assert aux == pytest.approx(r["ref_aux"], rel=TOL)
    assert r["load"] == r["ref_load"]  # expert load summed over the group: equal, so CV / dead are too
    assert r["same_names"] and r["num_grads"] > 50 and not r["ref_zero_grads"]
    assert r["grad_rel_max"] < TOL, r["grad_rel_worst"]


def test_sp_size_errors_name_the_fix():
    validate_sp_size(2, world_size=4, num_heads=32, num_kv_heads=4)
    validate_sp_size(8, world_size=8, num_heads=32, num_kv_heads=4)  # KV heads replicated
    with pytest.raises(ValueError, match=r"divide the world size 6; use one of \[1, 2\]"):
        validate_sp_size(4, world_size=6, num_heads=32, num_kv_heads=4)
    with pytest.raises(ValueError, match=r"divide the model's 4 attention \(query\) heads"):
        validate_sp_size(8, world_size=8, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match="KV heads"):
        validate_sp_size(4, world_size=4, num_heads=12, num_kv_heads=6)
    cfg = RootConfig()
    cfg.parallel.sp_size, cfg.model.attn_impl = 2, "sdpa_mask"
    with pytest.raises(ValueError, match="model.attn_impl=auto"):
        validate(cfg)
    cfg.parallel.sp_size = 0
    with pytest.raises(ValueError, match="parallel.sp_size must be >= 1"):
        validate(cfg)
    with pytest.raises(ValueError, match="positive integer"):
        validate_sp_size(0, world_size=2, num_heads=4, num_kv_heads=2)


def test_sp_groups_are_contiguous():
    assert sp_group_ranks(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert sp_group_ranks(16, 4)[1] == [4, 5, 6, 7]
