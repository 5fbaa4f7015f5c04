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


# -- hypothesis (tests/test_differential_fuzz.py) -------------------------------------------------
# `ci` (default): deterministic, bounded by FUZZ_SECONDS (75 s) in the test itself;
# `pytest --hypothesis-profile=long`: random seeds, FUZZ_SECONDS default 1200 s.
try:
    import hypothesis
    from hypothesis import HealthCheck, Phase, settings as _hsettings

    hypothesis.configuration.set_hypothesis_home_dir(str(ROOT / ".pytest_cache" / "hypothesis"))
    _common = dict(deadline=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
                   phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])   # no explain
    _hsettings.register_profile("ci", max_examples=400, derandomize=True, database=None, **_common)
    _hsettings.register_profile("long", max_examples=4000, **_common)
    _hsettings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:         # hypothesis is in the `test` extra; without it the fuzzer is skipped
    pass


def pytest_terminal_summary(terminalreporter):
    """The differential fuzzer's counts: graphs tried, rewritten, found wrong."""
    differential = sys.modules.get("differential")
    stats = getattr(differential, "STATS", None)
    if not stats:
        return
    terminalreporter.section("differential fuzzing")
    for key, value in stats.items():
        terminalreporter.write_line(f"{key:<44} {value}")
    for family, counts in sorted(getattr(differential, "FAMILY_STATS", {}).items()):
        terminalreporter.write_line(f"family {family:<37} {counts['tried']} tried, {counts['rewritten']} rewritten, "
                                    f"{counts['wrong']} wrong, {counts['discarded']} discarded")
