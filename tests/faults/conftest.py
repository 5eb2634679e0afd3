from tests.train.conftest import runtime  # noqa: F401  (the one in-process gloo group for trainer tests)
