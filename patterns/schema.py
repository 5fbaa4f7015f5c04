"""Attributes as the op defines them: the value written on the node, else the default of the
op's own schema at the opset the node is read at — never a default of ours.

ONNX ops: `onnx.defs.get_schema(op, max_inclusive_version=opset, domain)`. onnxruntime's contrib
ops have no schema in onnx: CONTRIB_DEFAULTS holds the defaults of the ones whose attributes
this package reads (tests/test_schema_defaults.py checks it against the installed onnxruntime's
own schemas).

The opset a node is read at is its graph's import of the node's domain: the model's for the
main graph, a local function's own, and for an If/Loop/Scan body (which imports nothing) the
graph it is nested in — `bind_scopes` records that on each body.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Mapping

import numpy as np
import onnx
import onnx_ir as ir


class SchemaUnknown(LookupError):
    """An attribute was read whose default no known schema gives (an op or attribute this
    package does not know, or a node whose opset cannot be found): a bug, never the model's."""


# The defaults of the contrib-op attributes read here, from onnxruntime's op definitions
# (onnxruntime/core/graph/contrib_ops/). None: the attribute has no default (required).
CONTRIB_DEFAULTS: dict[tuple[str, str], dict[str, float | int | None]] = {
    # bert_defs.cc: epsilon = kDefaultSkipLayerNormEpsilon, 1e-12f (contrib_defs.h)
    ("com.microsoft", "SkipLayerNormalization"): {"epsilon": 1e-12},
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): {"epsilon": 1e-12},
    # contrib_defs.cc: both registered in the ONNX domain since version 1 (onnx's own
    # LayerNormalization exists from opset 17, with the same defaults)
    ("", "SimplifiedLayerNormalization"): {"axis": -1, "epsilon": 1e-5, "stash_type": 1},
    ("", "LayerNormalization"): {"axis": -1, "epsilon": 1e-5, "stash_type": 1},
    # contrib_defs.cc
    ("com.microsoft", "FusedMatMul"): {"alpha": 1.0, "transA": 0, "transB": 0, "transBatchA": 0,
                                       "transBatchB": 0},
    ("com.microsoft", "MatMulNBits"): {"N": None, "K": None},
    # bert_defs.cc
    ("com.microsoft", "MultiHeadAttention"): {"num_heads": None},
    ("com.microsoft", "GroupQueryAttention"): {"num_heads": None, "kv_num_heads": None},
}

_SCOPE = "flashnorm.opset_imports"      # graph.meta key: the imports a nested body is read at


def domain_of(node: ir.Node) -> str:
    return "" if node.domain == "ai.onnx" else node.domain


def opset_imports(graph: ir.Graph | ir.Function) -> Mapping[str, int]:
    """The opsets `graph`'s nodes are read at (a nested body: those of its enclosing graph)."""
    if graph.opset_imports:
        return graph.opset_imports
    return graph.meta.get(_SCOPE) or {}


def bind_scopes(graph: ir.Graph | ir.Function) -> None:
    """Record on every If/Loop/Scan body nested in `graph` the opset imports it is read at."""
    imports = dict(opset_imports(graph))
    if not imports:
        return
    for node in graph:
        for attribute in node.attributes.values():
            bodies = [attribute.value] if attribute.type == ir.AttributeType.GRAPH else \
                list(attribute.value) if attribute.type == ir.AttributeType.GRAPHS else []
            for body in bodies:
                if not body.opset_imports:
                    body.meta[_SCOPE] = imports
                bind_scopes(body)


def node_opset(node: ir.Node) -> int:
    """The version of `node`'s domain its graph imports."""
    graph = node.graph
    imports = opset_imports(graph) if graph is not None else {}
    domain = domain_of(node)
    version = imports.get(domain, imports.get("ai.onnx") if domain == "" else None)
    if version is None:
        where = "its graph imports no opsets (an unbound nested body?)" if not imports else \
            f"the model imports no version of domain {domain!r}"
        raise SchemaUnknown(f"node {node.name!r} ({node.op_type}): {where}")
    return int(version)


def _as_python(value):
    return value.decode() if isinstance(value, bytes) else \
        [v.decode() if isinstance(v, bytes) else v for v in value] if isinstance(value, list) else value


@lru_cache(maxsize=None)
def _onnx_default(op_type: str, version: int, name: str):
    """(declared, default) from onnx's schema; None when onnx has no schema for the op."""
    try:
        schema = onnx.defs.get_schema(op_type, max_inclusive_version=version, domain="")
    except onnx.defs.SchemaError:
        return None
    declared = schema.attributes.get(name)
    if declared is None:
        return False, None
    default = declared.default_value
    if default.type == onnx.AttributeProto.UNDEFINED:
        return True, None
    return True, _as_python(onnx.helper.get_attribute_value(default))


def schema_default(node: ir.Node, name: str):
    """The default of attribute `name` of `node`'s op at the node's opset (None: the schema
    declares the attribute without a default). Raises SchemaUnknown when no known schema
    declares it."""
    domain = domain_of(node)
    found = _onnx_default(node.op_type, node_opset(node), name) if domain == "" else None
    if found is None:
        table = CONTRIB_DEFAULTS.get((domain, node.op_type), {})
        found = (name in table, table.get(name))
        if isinstance(found[1], float):      # a FLOAT attribute: the value the kernel reads
            found = (True, float(np.float32(found[1])))
    declared, default = found
    if not declared:
        raise SchemaUnknown(f"no known schema of {node.op_type} (domain {domain!r}) declares "
                            f"attribute {name!r} (node {node.name!r})")
    return default


def attr(node: ir.Node, name: str):
    """Attribute `name` of `node` as written, else its op's schema default; None when it is
    absent and the schema gives no default (the caller says what that means or refuses)."""
    written = node.attributes.get(name)
    return schema_default(node, name) if written is None else written.value
