"""Every repository file that the code, docs, recipes or bench scripts name exists in the
repository, and none of them points at a file outside it (a user's clone has only the repo)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["README.md", "docs", "qvl_train", "launch", "bench", "recipes", "configs"]
# a repo-relative path: starts at a top-level folder, not inside a longer (absolute) path
_REPO_PATH = re.compile(r"(?<![\w/.-])((?:bench|tests|docs|recipes|configs|launch|qvl_train|data)/[\w./-]+\.(?:py|sh|md|yaml|jsonl))")
_PLACEHOLDER = re.compile(r"\b(NAME|PATH)\b")


def _files():
    for name in SOURCES:
        path = ROOT / name
        yield from ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in (".py", ".md", ".sh", ".yaml")))


def test_named_repository_files_exist():
    missing = []
    for path in _files():
        for ref in _REPO_PATH.findall(path.read_text()):
            if not _PLACEHOLDER.search(ref) and not (ROOT / ref).exists():
                missing.append(f"{path.relative_to(ROOT)} names {ref}")
    assert missing == []


def test_nothing_points_outside_the_repository():
    outside = [f"{p.relative_to(ROOT)}: {m}" for p in _files() for m in re.findall(r"/work/\S+|\bdesign/[\w.-]+\.md", p.read_text())]
    assert outside == []
