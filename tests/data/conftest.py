"""Fixtures shared by the data tests: the repo-built tiny tokenizer dir, built once per session."""

import pytest

from qvl_train.data.tokenizer import build_tiny_tokenizer, load_tokenizer, write_processor_configs


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """Tokenizer files + processor configs of the tiny model (read-only for the tests)."""
    d = tmp_path_factory.mktemp("tiny_model")
    build_tiny_tokenizer(d)
    write_processor_configs(d)
    return d


@pytest.fixture(scope="session")
def tok(model_dir):
    return load_tokenizer(model_dir)
