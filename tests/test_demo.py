"""`python -m rewriter demo` on the tiny Llama: every step runs, the benchmark shows the original,
the peer (onnxscript's optimize_for_ort) and the rewritten graph in one table under 100 columns,
and the plot is where it says."""

import json

from rewriter import demo
from rewriter.errors import EXIT_OK


def test_demo_runs_every_step_and_ends_with_one_narrow_table(tmp_path, capsys):
    work = tmp_path / "demo"
    code = demo.main(["--size", "tiny", "--workdir", str(work), "--tokens", "1,8", "--budget", "0.2"])
    out = capsys.readouterr().out
    assert code == EXIT_OK, out
    for step in ("== 1/4 export", "== 2/4 rewrite", "== 3/4 verify", "== 4/4 benchmark", "demo passed"):
        assert step in out
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("shape "))
    table = lines[head:head + 4]            # header, rule, one row per token count
    assert [line.split()[:2] for line in table[2:]] == [["b1", "t1"], ["b1", "t8"]]
    assert all(len(line) <= 100 for line in table), table
    assert "onnxscript ms" in table[0] and "onnxscript÷ours" in table[0]
    assert sum(line.startswith("shape ") for line in lines) == 1        # the table is printed once
    assert f"plot: {work / 'bench.png'}" in out and (work / "bench.png").stat().st_size > 0
    result = json.loads((work / "bench.json").read_text())
    assert set(result["variants"]) == {"raw", "onnxscript", "rewritten"}
    for row in result["shapes"]:
        assert all(row["variants"][n]["median_ms"] > 0 for n in result["variants"]), row
