"""--measure: the whole model decides. Every candidate is checked exact, timed side by side, and
the fastest exact one is written, with the numbers in the report."""

import re

from models_cache import exported
from parity import assert_exact
from rewriter.verify import judge, make_inputs, run, session
from test_faults import cli


def test_measure_writes_the_fastest_exact_candidate(tmp_path):
    src = exported("llama", "dynamo", 18)
    dst, rep = tmp_path / "flash.onnx", tmp_path / "report.json"
    code, out, err = cli(src, "-o", dst, "--target", "ort-cpu", "--measure", "1,8", "--provider", "cpu",
                         "--report", rep, "--quiet")
    assert code == 0, err
    import json
    notes = json.loads(rep.read_text())["notes"]
    line = next(n for n in notes if n.startswith("--measure on cpu"))
    timed = {name: [float(t) for t in ms.split("/")]
             for name, ms in re.findall(r"([a-z-]+) ([0-9.e+-]+/[0-9.e+-]+)", line.split(": ", 1)[1])}
    # fold-fused is what ort-cpu asks for here: the same graph as "as-asked", timed once
    assert set(timed) == {"as-asked", "defer", "fold", "keep", "as-asked-unfused", "original"}, line
    winner = line.rsplit("→ wrote ", 1)[1]
    assert winner == min(timed, key=lambda n: timed[n][0] * timed[n][1]), line
    a, b = session(src, "cpu"), session(dst, "cpu")
    feeds = make_inputs(src, sess=a)
    assert_exact(judge(run(src, feeds, sess=a), run(dst, feeds, sess=b)))
    assert not list(tmp_path.glob(".flashnorm-*"))          # the candidates are gone
