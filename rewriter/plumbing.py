"""The graph plumbing every room of the rewrite shares: new nodes through one GraphEditor,
readers rerouted, a graph output handed to its replacement under its own name, replacements
remembered for the sites matched later, shared constants. transform.Rewriter is made of this
and the rooms built on it (rewriter/plumbing.py, fold.py, bias.py, rowmoves.py and kernels.py)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from rewriter.patterns.graph import GraphEditor, dtype_of, holds, op, users


class Plumbing:
    """Edits on one graph of a model: the main graph, or a subgraph (an If branch, a Loop
    body) whose new nodes and names get their own prefix (`edit`)."""

    def __init__(self, graph: ir.Graph, edit: GraphEditor):
        self.graph = graph
        self.edit = edit
        self.replaced: dict[ir.Value, ir.Value] = {}    # redirect()'s old → new, for later sites
        self._constants: dict = {}

    def insert_after(self, value: ir.Value, make) -> ir.Value:
        """Route every reader of `value` (graph outputs included) through `make(value)`; a later
        site matched against `value` (a norm reading a linear's output) reads `new` too."""
        readers = users(value)
        new = make(value)
        for node, index in readers:
            node.replace_input_with(index, new)
        self.take_output_slot(value, new)
        self.replaced[value] = new
        return new

    def redirect(self, old: ir.Value, new: ir.Value) -> None:
        """Replace `old` by the equivalent `new` everywhere (graph outputs included)."""
        if new.shape is None:
            new.shape = old.shape
        if (new.type is None or new.dtype is None) and old.type is not None:
            new.type = old.type
        was_output = old.is_graph_output()
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        if was_output:
            self._hand_over_name(old, new)
        self.replaced[old] = new

    def current(self, value: ir.Value | None) -> ir.Value | None:
        """`value` as the graph now has it: a later site matched against a value an earlier
        site replaced (a Skip* norm's residual output) must read the replacement, or the old
        producer stays alive."""
        while value in self.replaced:
            value = self.replaced[value]
        return value

    def take_output_slot(self, old: ir.Value, new: ir.Value) -> None:
        """`new` takes `old`'s places among the graph's outputs, under `old`'s name (`new`
        reads `old`, so not every use of `old` is replaced: not replace_all_uses_with)."""
        if not old.is_graph_output():
            return
        for i, out in enumerate(self.graph.outputs):
            if out is old:
                self.graph.outputs[i] = new
        self._hand_over_name(old, new)

    def _hand_over_name(self, old: ir.Value, new: ir.Value) -> None:
        """A graph output keeps its name (what callers feed and fetch): `new` takes it."""
        name, old.name = old.name, self.edit.fresh("renamed")
        new.name = name
        new.shape, new.type = new.shape or old.shape, new.type or old.type

    def narrow_source(self, value: ir.Value, dtype: ir.DataType | None) -> ir.Value:
        """`value` in `dtype`, skipping lossless Casts (widening or to the same type) back to
        a value already in `dtype` instead of casting again."""
        node = value.producer()
        if op(node, "Cast", domain="") and dtype is not None:
            source = node.inputs[0]
            lossless = holds(dtype_of(value), dtype_of(source))
            if lossless and dtype_of(source) in (dtype, dtype_of(value)):
                return self.narrow_source(source, dtype)
        return self.edit.cast(value, dtype) if dtype is not None else value

    def constant(self, value: int, shape, dtype: ir.DataType) -> ir.Value:
        """One shared initializer per (value, shape, dtype): unit gains, zero biases."""
        key = (value, tuple(shape), dtype)
        if key not in self._constants:
            self._constants[key] = self.edit.initializer(np.full(shape, value, dtype.numpy()),
                                                    "unit_gain" if value == 1 else "zero_beta", dtype=dtype)
        return self._constants[key]
