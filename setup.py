"""Package discovery that follows the tree: every package under rewriter/, and the repo's
patterns/ folder (with any subpackage) as rewriter.patterns — the mapping is `package-dir` in
pyproject.toml, which setuptools' `packages.find` does not apply, hence this file. models/,
tests/ and benchmarks/ are not installed."""

from setuptools import find_packages, setup

rewriter = find_packages(include=["rewriter", "rewriter.*"])
patterns = ["rewriter." + name for name in find_packages(include=["patterns", "patterns.*"])]
data = ["rewriter.data"]     # the cost tables (package-data): a folder of JSON, no code
setup(packages=rewriter + patterns + data)
