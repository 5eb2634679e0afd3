"""docs/scale.md's plan tables are what bench/scale_tables.py prints from today's plan
(qvl_train.plan): a change to the plan that moves a number fails here until the tables are
regenerated (`python bench/scale_tables.py`)."""

import copy
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tables(text: str) -> dict[str, list[str]]:
    """{model title: its table's rows} for every '### title' followed by a '|' table."""
    out: dict[str, list[str]] = {}
    title = None
    for line in text.splitlines():
        if line.startswith("### "):
            title = line[4:].split(" (")[0].strip()  # the doc adds "(31.1 B parameters)"
        elif title and line.startswith("|"):
            out.setdefault(title, []).append(line.strip())
        elif title and title in out and not line.strip().startswith("|"):
            title = None
    return out


def test_scale_doc_tables_are_the_plans_of_today(capsys):
    from qvl_train.config import compose

    spec = importlib.util.spec_from_file_location("scale_tables", REPO / "bench/scale_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    composed: dict[tuple, object] = {}

    def compose_once(overrides: list[str]):
        """Hydra composes each recipe once; only the columns' ep_size differs (48 cells, 12 recipes)."""
        ep = [o for o in overrides if o.startswith("parallel.ep_size=")]
        key = tuple(o for o in overrides if o not in ep)
        if key not in composed:
            composed[key] = compose(list(key))
        cfg = copy.deepcopy(composed[key])
        for o in ep:
            cfg.parallel.ep_size = int(o.split("=", 1)[1])
        return cfg

    tables.compose = compose_once
    capsys.readouterr()
    tables.main()
    out = capsys.readouterr().out
    printed, doc = _tables(out), (REPO / "docs/scale.md").read_text()
    documented = _tables(doc)
    recipe_line = out.strip().splitlines()[-1]
    assert recipe_line.startswith("235B-A22B full SFT") and recipe_line in doc, recipe_line
    assert sorted(printed) == ["Qwen3-VL-235B-A22B", "Qwen3-VL-30B-A3B"]
    for title, rows in printed.items():
        assert documented.get(title) == rows, f"docs/scale.md's {title} table is not today's plan: rerun bench/scale_tables.py"
