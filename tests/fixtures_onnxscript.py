"""onnxscript's test fixtures (onnxscript/rewriter/models/_*.py): graphs captured from real torch
dynamo exports of the 2.5/2.6 era, every weight a Constant node, shapes baked into the graph.

`build(name, folder, weights=..., storage=...)` writes one fixture to `folder/NAME.onnx` through
the fixture's own `make_model(...)`, given tensors of the shapes its
`make_model_with_random_weights()` asks for (read by running that function against a stand-in
numpy that allocates nothing, so no shape is copied here):

weights
- "fixture": uniform [0, 1) as the fixture draws them (every weight positive);
- "scaled": matrices (two or more axes longer than 1) uniform ±1/√fan-in, zero-mean as trained
  weights are; vectors (gains, biases, RoPE frequencies) as the fixture draws them. With the
  fixture's all-positive weights a LayerNorm after a few layers cancels a huge common mean: the
  original's own fp32 noise (ORT optimization on vs off) is ~1e-5 relative on the Whisper
  encoder's output, so the 1e-5 bar would measure nothing there.
storage
- "inline": in the Constant nodes, as the fixture builds it (a proto under 2 GiB only);
- "initializers": each weight an external-data initializer in NAME.onnx.data, written chunk
  by chunk (how torch's exporter stores parameters; the build needs a chunk of memory, so
  SmolLM's 49152×2048 head and Phi-4's 6.5 GB fit);
- "constants": Constant nodes whose tensors are external data (onnxruntime runs it).

`feeds(name, path)` are the fixture's own `get_ort_inputs()` (seeded), or — for the Phi
fixtures, which have none — inputs made from the graph (rewriter.verify.make_inputs).
"""

from __future__ import annotations

import importlib
import types
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

PACKAGE = "onnxscript.rewriter.models"
# name: (module, the test-class factory with get_onnx_model / get_ort_inputs)
FIXTURES = {
    "smollm_1": ("_smollm_1", "smollm_test_1"),
    "smollm_2": ("_smollm_2", "smollm_test_2"),
    "whisper_encoder": ("_whisper_encoder", "whisper_encoder_test"),
    "whisper_decoder": ("_whisper_decoder", "whisper_decoder_test"),
    "bart_encoder": ("_bart_encoder", "bart_encoder_test"),
    "phi2lm": ("_phi2lm", "phi2lm_test"),
    "phi4lm": ("_phi4lm", "phi4lm_test"),
}
WEIGHTS = ("fixture", "scaled")
STORAGE = ("inline", "initializers", "constants")
CHUNK = 1 << 22          # values drawn and written at a time (16 MiB of fp32)


def module(name: str):
    return importlib.import_module(f"{PACKAGE}.{FIXTURES[name][0]}")


class Spec:
    """What `np.random.rand(*shape).astype(np.float32)` / `np.zeros(shape, np.float32)` would have
    made in make_model_with_random_weights()."""

    def __init__(self, shape, kind: str):
        self.shape, self.kind = tuple(int(d) for d in shape), kind

    def astype(self, dtype):
        assert np.dtype(dtype) == np.float32, dtype
        return self

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def is_matrix(self) -> bool:
        return sum(d > 1 for d in self.shape) >= 2

    def draw(self, rng: np.random.Generator, weights: str, start: int, n: int) -> np.ndarray:
        """Values [start, start + n) of the flattened tensor."""
        if self.kind == "zeros":
            return np.zeros(n, np.float32)
        values = rng.random(n, dtype=np.float32)
        if weights == "scaled" and self.is_matrix:
            fan_in = int(np.prod(self.shape[1:])) if len(self.shape) > 2 else self.shape[-1]
            values = (2 * values - 1) / np.float32(np.sqrt(fan_in))
        return values


def weight_specs(name: str) -> tuple[list[Spec], dict[str, Spec]]:
    """(args, kwargs) that make_model_with_random_weights() passes to make_model, as Specs."""
    mod = module(name)
    captured = {}
    fake_np = types.SimpleNamespace(
        random=types.SimpleNamespace(rand=lambda *shape: Spec(shape, "rand"), seed=lambda *_: None),
        zeros=lambda shape, dtype=np.float32: Spec(np.atleast_1d(shape), "zeros").astype(dtype),
        float32=np.float32)
    replace = {"np": fake_np, "numpy": fake_np, "ir": types.SimpleNamespace(tensor=lambda x: x),
               "make_model": lambda *args, **kwargs: captured.update(args=args, kwargs=kwargs)}
    saved = {k: getattr(mod, k) for k in replace if hasattr(mod, k)}
    try:
        for k in saved:
            setattr(mod, k, replace[k])
        mod.make_model_with_random_weights()
    finally:
        for k, v in saved.items():
            setattr(mod, k, v)
    args, kwargs = list(captured["args"]), dict(captured["kwargs"])
    assert args or kwargs, f"{name}: make_model was not called"
    assert all(isinstance(s, Spec) for s in [*args, *kwargs.values()]), f"{name}: a weight was not captured"
    return args, kwargs


def weight_bytes(name: str) -> int:
    args, kwargs = weight_specs(name)
    return sum(4 * s.size for s in [*args, *kwargs.values()])


def build(name: str, folder, *, weights: str = "scaled", storage: str = "inline", seed: int = 0) -> Path:
    """Write fixture `name` to folder/NAME.onnx (weights and storage: see the module doc)."""
    assert weights in WEIGHTS and storage in STORAGE, (weights, storage)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.onnx"
    args, kwargs = weight_specs(name)
    rng = np.random.default_rng(seed)
    if storage == "inline":
        def make(spec: Spec, label: str):
            return ir.tensor(spec.draw(rng, weights, 0, spec.size).reshape(spec.shape), name=label)
        proto = module(name).make_model(*[make(s, f"arg{i}") for i, s in enumerate(args)],
                                        **{k: make(s, k) for k, s in kwargs.items()})
        onnx.save(proto, path)
        return path
    data, offset = f"{path.name}.data", 0
    with open(folder / data, "wb") as f:
        def make(spec: Spec, label: str):
            nonlocal offset
            for start in range(0, spec.size, CHUNK):
                f.write(spec.draw(rng, weights, start, min(CHUNK, spec.size - start)).tobytes())
            tensor = ir.ExternalTensor(data, offset=offset, length=4 * spec.size, dtype=ir.DataType.FLOAT,
                                       shape=ir.Shape(spec.shape), name=label, base_dir=str(folder))
            offset += 4 * spec.size
            return tensor
        proto = module(name).make_model(*[make(s, f"arg{i}") for i, s in enumerate(args)],
                                        **{k: make(s, k) for k, s in kwargs.items()})
    if storage == "initializers":
        lift_external_constants(proto)
    onnx.save(proto, path)
    return path


def lift_external_constants(proto: onnx.ModelProto) -> int:
    """Make every Constant node whose tensor is external data an initializer of the same name.
    Returns how many were lifted."""
    graph, keep, lifted = proto.graph, [], 0
    for node in graph.node:
        attribute = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if attribute is not None and attribute.name == "value" \
                and attribute.t.data_location == onnx.TensorProto.EXTERNAL:
            init = graph.initializer.add()
            init.CopyFrom(attribute.t)
            init.name = node.output[0]
            lifted += 1
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    return lifted


def feeds(name: str, path, seed: int = 0) -> dict[str, np.ndarray]:
    """The fixture's own inputs (get_ort_inputs, numpy's global generator seeded), else inputs
    made from the graph."""
    test = getattr(module(name), FIXTURES[name][1])()
    if hasattr(test, "get_ort_inputs"):
        np.random.seed(seed)
        return dict(test.get_ort_inputs())
    from rewriter.verify import make_inputs
    return make_inputs(path, batch=1, seq=8, past=4, seed=seed)
