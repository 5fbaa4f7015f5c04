import os
import sys

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_sessionfinish(session, exitstatus):
    """Remove the exports cache unless the user pointed FLASHNORM_TEST_CACHE at a folder."""
    if not os.environ.get("FLASHNORM_TEST_CACHE"):
        import shutil
        from models_cache import CACHE
        shutil.rmtree(CACHE, ignore_errors=True)


@pytest.fixture
def dirs(tmp_path):
    """An input folder and an output folder (fault and external-data tests)."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    return src, out
