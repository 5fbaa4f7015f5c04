"""Options: one rule picks the strategy every site gets unless a cost table says otherwise —
strategy > target > mode — and the kinds are enums whose values are the strings the report,
the cost files and the command line use."""

import json

import pytest

from rewriter.patterns import Form, NormKind
from rewriter.plan import TARGETS, Action, Decision, Mode, Options, Strategy, Target


@pytest.mark.parametrize("fields,expected", [
    ({}, Strategy.DEFER),
    ({"mode": "fold"}, Strategy.FOLD),
    ({"target": "portable"}, Strategy.DEFER),
    ({"target": "ort-cuda", "mode": "fold"}, TARGETS[Target.ORT_CUDA]["reference"]),    # target over mode
    ({"target": "ort-cpu", "strategy": "defer"}, Strategy.DEFER),                        # strategy over target
    ({"mode": "fold", "strategy": "defer-normop"}, Strategy.DEFER_NORMOP),               # strategy over mode
])
def test_one_rule_picks_the_strategy(fields, expected):
    assert Options(**fields).default_strategy == expected


def test_the_kinds_are_their_strings():
    options = Options(mode="fold", target="ort-cpu", strategy="fold-fused")
    assert (type(options.mode), type(options.target), type(options.strategy)) == (Mode, Target, Strategy)
    assert (options.mode, options.target, options.strategy) == ("fold", "ort-cpu", "fold-fused")
    assert f"{options.strategy}|{options.strategy:>11}|{options.strategy!r}" == "fold-fused| fold-fused|'fold-fused'"
    assert json.dumps({"kind": NormKind.RMS, Form.FUSED: Action.SKIP}) == '{"kind": "rms", "fused": "skip"}'
    decision = Decision(None, None, "skip", strategy="keep")
    assert (type(decision.action), type(decision.strategy)) == (Action, Strategy)


@pytest.mark.parametrize("field,value", [("strategy", "fused"), ("target", "gpu"), ("mode", "defer-normop")])
def test_an_unknown_value_is_refused_with_the_choices(field, value):
    with pytest.raises(ValueError, match=f"unknown {field} '{value}' \\(choose from "):
        Options(**{field: value})
