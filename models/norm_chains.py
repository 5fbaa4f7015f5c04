"""Print the norm subgraphs of an ONNX file as op-type chains (a debugging aid, not a matcher).

    python -m models.norm_chains model.onnx [--all]

For each anchor (ReduceMean over a square, LayerNormalization, RMSNormalization,
(Skip)SimplifiedLayerNormalization, SkipLayerNormalization, Tanh) it walks back over
Pow/Mul(x,x)/Cast to the norm input and forward over elementwise ops to the consumers, e.g.
``Pow → ReduceMean → Add(c) → Sqrt → Reciprocal → Mul → Mul(w) ⇒ [MatMul, MatMul, MatMul]``.
``(c)``/``(w)`` mark constant inputs (scalar / tensor), from initializers or Constant nodes.
"""
from __future__ import annotations

import sys
from collections import Counter, defaultdict

import onnx
from onnx import numpy_helper

ANCHORS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
           "SkipSimplifiedLayerNormalization", "SkipLayerNormalization", "Tanh"}
CHAIN_OPS = {"Add", "Sqrt", "Reciprocal", "Div", "Mul", "Cast", "Sub", "Pow", "ReduceMean",
             "Tanh", "Neg", "Identity"}
STOP = {"MatMul", "Gemm", "FusedMatMul", "MatMulNBits"}


class Graph:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.nodes = list(g.node)
        self.consts = {i.name: i for i in g.initializer}
        self.producer = {}
        self.consumers = defaultdict(list)
        for n in self.nodes:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = a.t
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers[i].append(n)

    def is_const(self, name):
        return name in self.consts

    def const_size(self, name):
        t = self.consts.get(name)
        if t is None:
            return None
        return int(numpy_helper.to_array(t).size) if hasattr(t, "dims") else None

    def tag(self, n):
        marks = []
        for i in n.input:
            if self.is_const(i):
                marks.append("c" if (self.const_size(i) or 0) <= 1 else "w")
        if n.op_type == "Cast":
            to = next((a.i for a in n.attribute if a.name == "to"), None)
            return f"Cast({onnx.TensorProto.DataType.Name(to).lower()})" if to else "Cast"
        return n.op_type + (f"({','.join(marks)})" if marks else "")


def _is_square(g: Graph, n) -> bool:
    if n.op_type == "Pow":
        return True
    if n.op_type == "Mul" and len(n.input) == 2 and n.input[0] == n.input[1]:
        return True
    return False


def chains(model: onnx.ModelProto, include_tanh=True):
    g = Graph(model)
    out = []
    seen = set()
    for n in g.nodes:
        anchor = False
        if n.op_type == "ReduceMean":
            p = g.producer.get(n.input[0])
            anchor = p is not None and _is_square(g, p)
        elif n.op_type in ANCHORS and (include_tanh or n.op_type != "Tanh"):
            anchor = True
        if not anchor or id(n) in seen:
            continue
        # walk back over the square / casts / DyT alpha Mul
        back = []
        cur = n
        if n.op_type == "ReduceMean":
            cur = g.producer[n.input[0]]
            back.append(cur)
            while True:
                src = cur.input[0]
                p = g.producer.get(src)
                if p is not None and p.op_type == "Cast":
                    back.append(p)
                    cur = p
                else:
                    break
        elif n.op_type == "Tanh":
            p = g.producer.get(n.input[0])
            if p is not None and p.op_type == "Mul":
                back.append(p)
        back.reverse()
        # walk forward: follow the chain while there is a single chain-op consumer
        fwd = [n]
        cur = n
        while True:
            cons = g.consumers.get(cur.output[0], [])
            chain_cons = [c for c in cons if c.op_type in CHAIN_OPS and c.op_type != "ReduceMean"]
            if len(cons) == 1 and chain_cons:
                cur = chain_cons[0]
                fwd.append(cur)
                continue
            break
        for x in fwd:
            seen.add(id(x))
        ends = g.consumers.get(cur.output[0], [])
        end_types = [c.op_type for c in ends]
        if any(o.name == cur.output[0] for o in model.graph.output):
            end_types.append("<graph output>")
        s = " → ".join(g.tag(x) for x in back + fwd) + " ⇒ [" + ", ".join(end_types) + "]"
        name = next((x.name for x in fwd if x.name), "")
        out.append((name, s))
    return out


def summarize(path, show_all=False):
    m = onnx.load(str(path), load_external_data=False)
    cs = chains(m)
    cnt = Counter(s for _, s in cs)
    lines = []
    for s, k in cnt.most_common():
        lines.append(f"{k:3d} × {s}")
    if show_all:
        lines += [f"    {name}: {s}" for name, s in cs]
    return "\n".join(lines)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    for p in args:
        print(f"== {p}")
        print(summarize(p, "--all" in sys.argv))
