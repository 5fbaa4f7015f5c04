"""Differential fuzzing of `--rotate` / `--rotate-online` (rewriter.rotate) on random
residual-stream models (tests/rotate_fuzz.py), and the adversarial graphs found by reading
rewriter/rotate/stream.py for gaps.

Per model: rewrite with rotate=True and with rotate_online=True. Applied: every output exact by
the project's standard, judged by tests/differential.py's Checker (≤ 1e-5 relative to the
original, ≤ 1.5× the original's error against the float64 reference + its noise floor).
Refused: a reason and the node or value at fault (one the graph has), and the output is the
non-rotating fold's (the same constants) and exact. Anything but a documented RewriterError is a
failure. Counts (applied, refused by reason) go to the terminal summary (differential.STATS).

Budget: the `ci` profile runs ROTATE_FUZZ_EXAMPLES (default 60) models or ROTATE_FUZZ_SECONDS
(default 45 s), whichever ends first; `--hypothesis-profile=long` runs 3000 models or 1200 s.
"""

from __future__ import annotations

import os
import re
import time

import numpy as np
import onnx
import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, note, settings

import differential as diff
from rewriter import rewrite
from rewriter.errors import EXIT_INTERNAL, RewriterError
from rotate_fuzz import cases

LONG = settings.get_current_profile_name() == "long"
EXAMPLES = int(os.environ.get("ROTATE_FUZZ_EXAMPLES", 3000 if LONG else 60))
SECONDS = float(os.environ.get("ROTATE_FUZZ_SECONDS", 1200 if LONG else 45))
STATS = diff.STATS


def _initializers(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


def _names(*models: onnx.ModelProto) -> set[str]:
    names = set()
    for m in models:
        for node in m.graph.node:
            names.add(node.name)
            names.update(node.output)
        names.update(i.name for i in m.graph.input)
        names.update(t.name for t in m.graph.initializer)
    return names


def check_rotation(model: onnx.ModelProto, checker: diff.Checker | None = None, seed: int = 0) -> list[str]:
    """Rotate `model` both ways and judge it; returns the failures (empty: fine). Counts go
    to STATS."""
    checker = checker or diff.Checker(model)
    failures: list[str] = []
    try:
        folded, _ = rewrite(model, mode="fold", clone_shared=True)
    except RewriterError as exc:
        STATS[f"rotation: fold refused ({type(exc).__name__})"] += 1
        return [] if getattr(exc, "exit_code", None) != EXIT_INTERNAL else [f"fold: internal error {exc}"]
    for online in (False, True):
        name = "rotate-online" if online else "rotate"
        try:
            out, report = rewrite(model, rotate=True, rotate_online=online, rotate_seed=seed)
        except RewriterError as exc:
            if getattr(exc, "exit_code", None) == EXIT_INTERNAL:
                failures.append(f"[{name}] internal error: {type(exc).__name__}: {exc}")
            STATS[f"rotation: rewrite refused ({type(exc).__name__})"] += 1
            continue
        except Exception as exc:        # noqa: BLE001 (any other exception is the failure)
            import traceback
            where = traceback.extract_tb(exc.__traceback__)[-1]
            failures.append(f"[{name}] {type(exc).__name__}: {str(exc)[:300]} "
                            f"(at {where.filename.split('/')[-1]}:{where.lineno})")
            continue
        rot = report.rotation or {}
        if rot.get("applied"):
            STATS[f"rotation applied ({name})"] += 1
            if online and rot.get("online"):
                STATS["rotation applied with online Hadamards"] += 1
        else:
            reason = re.sub(r"\[.*?\]|\d+", "#", rot.get("reason", "?"))
            STATS[f"rotation refused ({name}): {reason}"] += 1
            quoted = re.findall(r'"([^"]*)"', rot.get("at") or "")
            if not rot.get("reason") or not quoted or not set(quoted) <= _names(model, folded):
                failures.append(f"[{name}] refused without a reason or a node the graph has: {rot}")
            if _initializers(out) != _initializers(folded):
                failures.append(f"[{name}] refused, but the constants differ from the fold's: {rot}")
        failures += [f"[{name}{' applied' if rot.get('applied') else ' refused'}] {f}"
                     for f in checker.judge(name, out)]
    return failures


_start: list[float] = []


@settings(max_examples=EXAMPLES, suppress_health_check=list(HealthCheck), deadline=None)
@given(case=cases())
def test_rotation_fuzz(case):
    if not _start:
        _start.append(time.monotonic())
    if time.monotonic() - _start[0] > SECONDS:
        return          # the time budget is spent (the remaining draws pass trivially)
    note(repr(case))
    try:
        checker = diff.Checker(case.model)
    except diff.InvalidOriginal as exc:
        STATS["rotation: invalid original (generator)"] += 1
        assume(False)
        raise AssertionError(str(exc))
    STATS[f"rotation models ({'poison ' + case.poison if case.poison else 'clean'})"] += 1
    failures = check_rotation(case.model, checker)
    if failures and os.environ.get("ROTATE_FUZZ_SAVE"):
        onnx.save(case.model, os.path.join(os.environ["ROTATE_FUZZ_SAVE"], f"rot-{abs(hash(repr(case)))}.onnx"))
    assert not failures, f"{case!r}\n" + "\n".join(failures)
