"""The layout README's map states, kept true: one installed namespace, imports pointing one way
(down the layers below), no module-level cycle dodged by a function-local import, and no file
of the package over 500 lines."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# module -> layer: a module imports only modules of a lower layer (README, Layout)
LAYERS = {
    "rewriter.errors": 0, "rewriter.args": 1,
    "rewriter.patterns.schema": 0.5, "rewriter.patterns.graph": 1, "rewriter.patterns.base": 2, "rewriter.patterns.rmsnorm": 3,
    "rewriter.patterns.fused": 4, "rewriter.patterns.layernorm": 4, "rewriter.patterns.linear": 4,
    "rewriter.patterns": 5,
    "rewriter.rotate.hadamard": 6, "rewriter.rotate.stream": 6, "rewriter.rotate.heads": 6.5, "rewriter.rotate.apply": 7, "rewriter.rotate.online": 7,
    "rewriter.rotate": 8,
    "rewriter.inline": 8.5, "rewriter.feeds": 9, "rewriter.promote": 9,
    "rewriter.validate": 10, "rewriter.files": 10, "rewriter.verify": 10, "rewriter.scale": 10,
    "rewriter.scale_muls": 10.2, "rewriter.scale_stops": 10.2, "rewriter.scale_walker": 10.5,
    "rewriter.weights": 10, "rewriter.conv": 10, "rewriter.plan": 10,
    "rewriter.plumbing": 10.5,
    "rewriter.io": 11, "rewriter.report": 11, "rewriter.costs": 11, "rewriter.kernels": 11,
    "rewriter.fold": 11, "rewriter.bias": 11, "rewriter.rowmoves": 11,
    "rewriter.transform": 12, "rewriter.compose": 12.5, "rewriter.passes": 13, "rewriter.pipeline": 13.5, "rewriter.api": 14, "rewriter.folders": 14.5, "rewriter.quantize": 14.7, "rewriter.explain": 15,
    "rewriter.bench.timing": 16, "rewriter.bench.graphs": 16, "rewriter.bench.passes": 16,
    "rewriter.bench.variants": 17, "rewriter.bench.present": 18, "rewriter.calibrate": 18,
    "rewriter.measure": 18,
    "rewriter.integrations.olive_config": 15.5, "rewriter.integrations.olive_pass": 16,
    "rewriter.integrations": 16.5,
    "rewriter.bench.cli": 19, "rewriter.bench": 19, "rewriter.demo": 20, "rewriter.cli": 21,
    "rewriter": 22, "rewriter.__main__": 23,
}
# optional or heavy third-party packages a function may import where it needs them
LAZY_OK = {"torch", "matplotlib", "onnxruntime", "onnx_graphsurgeon", "onnxscript", "transformers", "models"}


def modules():
    for folder, package in (("rewriter", "rewriter"), ("patterns", "rewriter.patterns")):
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            yield name, path


def imports(name: str, path: Path):
    """(imported module, is top-level) for each import of a rewriter module in `path`."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in LAYERS else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            yield target, node.col_offset == 0


ALL = dict(modules())


def test_every_module_has_a_layer():
    assert set(ALL) <= set(LAYERS), set(ALL) - set(LAYERS)


@pytest.mark.parametrize("name", sorted(ALL))
def test_imports_point_down(name):
    wrong = []
    for target, top in imports(name, ALL[name]):
        if target in LAYERS and target != name:
            if LAYERS[target] >= LAYERS[name]:
                wrong.append(f"{target} (layer {LAYERS[target]} ≥ {LAYERS[name]})")
            elif not top and name != "rewriter.cli":
                wrong.append(f"{target} imported inside a function")
        elif not top and target.split(".")[0] not in LAZY_OK | set(sys.stdlib_module_names) \
                and not target.startswith("rewriter"):
            wrong.append(f"{target} imported inside a function")
    assert not wrong, f"{name}: " + "; ".join(wrong)


def test_patterns_import_nothing_but_themselves():
    for name, path in ALL.items():
        if name.startswith("rewriter.patterns"):
            bad = [t for t, _ in imports(name, path) if t.startswith("rewriter") and not t.startswith("rewriter.patterns")]
            assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("name", sorted(ALL))
def test_no_file_over_500_lines(name):
    lines = ALL[name].read_text().count("\n")
    assert lines <= 500, f"{ALL[name]}: {lines} lines"


def test_the_wheel_installs_one_top_level_name(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("*.whl"))
    files = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in files if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"rewriter"}, tops          # models/, tests/, benchmarks/ stay in the repo
    # every module of the tree, patterns/ as rewriter/patterns/ (package-dir), and the cost tables
    tree = {"/".join(name.split(".")) + ("/__init__.py" if path.name == "__init__.py" else ".py")
            for name, path in ALL.items()}
    assert tree <= files, sorted(tree - files)
    data = {f"rewriter/data/{p.name}" for p in (ROOT / "rewriter" / "data").glob("*.json")}
    assert data and data <= files, sorted(data - files)


def test_declared_floors_are_the_tested_ones():
    """pyproject's core floors are exactly the versions scripts/check_lowest.sh installs."""
    text = (ROOT / "pyproject.toml").read_text()
    core = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    floors = dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', core))
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([0-9.]+)$", (ROOT / "ci" / "lowest-constraints.txt").read_text(), re.M))
    assert floors and pins == {k: v if v.count(".") == 2 else v + ".0" for k, v in floors.items()}, (floors, pins)
    assert not {"torch", "onnx-graphsurgeon", "ml_dtypes"} & set(floors)       # extras, not core
