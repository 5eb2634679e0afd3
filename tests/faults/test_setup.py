"""Setup and data faults that need no training run: a missing model dir, a model dir without a
tokenizer, a '+key' the schema lacks, ShareGPT placeholders without media, generate_max_samples,
the collective timeout reaching the process group, and a run dir that other nodes cannot see."""

import json
from datetime import timedelta
from pathlib import Path

import pytest

from qvl_train.config import compose, to_config
from qvl_train.data import BadSample, build_tiny_tokenizer, encode_sample, load_tokenizer
from qvl_train.data import inspect as data_inspect


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def test_a_missing_model_path_says_not_found(tmp_path):
    from qvl_train.train.trainer import prepare_tokenizer

    cfg = to_config(compose(["+recipe=vqa", f"model.path={tmp_path / 'nope'}", "model.preset=null"]))
    with pytest.raises(ValueError, match=r"model.path=.*nope: not found"):
        prepare_tokenizer(cfg, tmp_path, None)


def test_a_model_dir_without_tokenizer_names_the_files_and_tokenizer_path(tmp_path):
    from qvl_train.model import build_model, save_pretrained
    from qvl_train.train.trainer import prepare_tokenizer

    save_pretrained(build_model("tiny"), tmp_path / "m")  # config + weights, no tokenizer
    cfg = to_config(compose(["+recipe=vqa", f"model.path={tmp_path / 'm'}", "model.preset=null"]))
    with pytest.raises(ValueError, match="missing merges.txt, tokenizer.json, vocab.json.*model.tokenizer_path"):
        prepare_tokenizer(cfg, tmp_path, None)
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no weights"):
        prepare_tokenizer(to_config(compose(["+recipe=vqa", f"model.path={tmp_path / 'no_weights'}"])), tmp_path, None)


def test_a_plus_key_the_schema_lacks_is_rejected():
    with pytest.raises(ValueError, match=r"train.max_step \(did you mean train.max_steps\?\)"):
        to_config(compose(["+recipe=vqa", "+train.max_step=10"]))
    with pytest.raises(ValueError, match="unknown config key.*data.datasets.0.pth"):
        to_config(compose(["+recipe=vqa", "+data.datasets.0.pth=x.jsonl"]))
    to_config(compose(["+recipe=vqa", "train.max_steps=10"]))  # a real key still works


def test_sharegpt_placeholder_without_media_is_a_bad_sample_and_inspect_reports_it(tmp_path, tiny_tokenizer, capsys):
    sample = {"conversations": [{"from": "human", "value": "<image>What colour?"}, {"from": "gpt", "value": "red"}]}
    with pytest.raises(BadSample) as e:
        encode_sample(sample, tokenizer=tiny_tokenizer)
    assert e.value.reason == "placeholder_mismatch"
    text_only = {"conversations": [{"from": "human", "value": "Say red."}, {"from": "gpt", "value": "red"}]}
    assert encode_sample(text_only, tokenizer=tiny_tokenizer)["num_visual_tokens"] == 0
    (tmp_path / "d.jsonl").write_text(json.dumps(text_only) + "\n" + json.dumps(sample) + "\n")
    assert data_inspect.main([str(tmp_path / "d.jsonl"), "--show", "-1"]) == 0
    out = capsys.readouterr().out
    assert "1 bad" in out and f"bad[placeholder_mismatch] x1, first: {tmp_path / 'd.jsonl'}:2" in out


def test_generate_max_samples_is_honoured(tiny_tokenizer):
    from qvl_train.train.evaluate import eval_batches

    cfg = to_config(compose(["+recipe=vqa"])).data
    for n in (3, 8):
        batches = eval_batches(cfg, tiny_tokenizer, rank=0, world=1, max_samples=n)
        assert sum(b["input_ids"].shape[0] for b in batches) == n


def test_parallel_timeout_minutes_reaches_the_process_group(monkeypatch):
    import deepspeed

    from qvl_train.parallel.runtime import init_runtime

    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(deepspeed, "init_distributed", fake_init)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.get(key, "0" if key != "WORLD_SIZE" else "1"))
    with pytest.raises(RuntimeError, match="stop here"):
        init_runtime("gloo", timeout_minutes=0.5)
    assert seen["timeout"] == timedelta(seconds=30)
    assert to_config(compose(["+recipe=vqa"])).parallel.timeout_minutes == 10.0


def test_a_run_dir_that_another_node_cannot_see_is_refused(tmp_path, runtime, monkeypatch):
    from qvl_train.parallel.runtime import check_shared_dir

    check_shared_dir(tmp_path, runtime)  # one machine: shared
    real = Path.read_text

    def node_local(self, *args, **kwargs):  # what a rank on another node's local disk sees: no such file
        if self.name == ".shared_by_every_rank":
            raise FileNotFoundError(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", node_local)
    with pytest.raises(ValueError, match=rf"output_dir: the run dir {tmp_path} is not shared: 1 rank\(s\) on .* do not see"):
        check_shared_dir(tmp_path, runtime)
