"""The only edits of the scale walk: a value times its factor s^p, one Mul per value, the
factor (s, s·s, 1/s or s^p, cast to the value's type) made once and shared."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from rewriter.patterns.graph import GraphEditor, dtype_of, set_dtype
from rewriter.scale import Scaled

D = ir.DataType


class ScaleMuls:
    def __init__(self, edit: GraphEditor):
        self.edit = edit
        self._applied: dict[ir.Value, ir.Value] = {}
        self._factor: dict[tuple, ir.Value] = {}
        self.count = 0          # Muls made

    # -- materialization ------------------------------------------------------------------
    def factor(self, state: Scaled, dtype: ir.DataType | None) -> ir.Value:
        key = (state.scale, state.degree, dtype)
        if key not in self._factor:
            f = state.scale
            if state.degree == 2:
                f = self.edit.op1("Mul", f, f, hint="scale_sq")
            elif state.degree == -1:
                f = self.edit.op1("Reciprocal", f, hint="scale_inv")
            elif state.degree != 1:
                exponent = self.edit.initializer(np.array(state.degree, (dtype_of(f) or D.FLOAT).numpy()), "degree")
                f = self.edit.op1("Pow", f, exponent)
            self._factor[key] = self.edit.cast(f, dtype) if dtype is not None else f
        return self._factor[key]

    def apply(self, value: ir.Value, state: Scaled) -> ir.Value:
        """value ⊙ scale^degree, made once per value."""
        if value not in self._applied:
            out = self.edit.op1("Mul", value, self.factor(state, dtype_of(value)), hint="deferred_scale")
            set_dtype(out, dtype_of(value))
            out.shape = value.shape
            self._applied[value] = out
            self.count += 1
        return self._applied[value]
