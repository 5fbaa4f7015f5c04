"""Inside an export script: torch.onnx.export(..., dynamo=True) → rewrite() → the same
ONNXProgram, rewritten exactly, ready to save or run."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rewriter import rewrite  # noqa: E402


class Block(torch.nn.Module):
    def __init__(self, d=32, h=48):
        super().__init__()
        self.norm = torch.nn.RMSNorm(d, eps=1e-6)
        with torch.no_grad():
            self.norm.weight.copy_(1 + 0.3 * torch.randn(d))
        self.up, self.down = torch.nn.Linear(d, h, bias=False), torch.nn.Linear(h, d, bias=False)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


def test_rewrite_an_onnx_program(tmp_path):
    torch.manual_seed(0)
    module = Block().eval()
    x = torch.randn(2, 7, 32)
    program = torch.onnx.export(module, (x,), dynamo=True, verbose=False)
    import onnxruntime as ort
    feeds = {program.model.graph.inputs[0].name: x.numpy()}
    want = ort.InferenceSession(program.model_proto.SerializeToString()).run(None, feeds)[0]
    out, report = rewrite(program)
    assert out is program and report.rewritten == 1, report.table()
    program.save(str(tmp_path / "flash.onnx"))
    got = ort.InferenceSession(str(tmp_path / "flash.onnx")).run(None, feeds)[0]
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-5
    with torch.no_grad():
        assert np.allclose(got, module(x).numpy(), atol=1e-5)
