"""torch.export and ONNX (dynamo exporter, run in ONNX Runtime) of whole Sinkhorn models, padded batches included."""

import numpy as np
import pytest
import torch
from tiny_models import make_tiny

import sinkhorn_hf  # noqa: F401


def _tiny(family: str, iterations: int):
    tiny = make_tiny(family, "sinkhorn")
    tiny.model.config.sinkhorn_iterations = iterations
    return tiny


@pytest.mark.parametrize("iterations", [pytest.param(1, marks=pytest.mark.slow), 3])  # K=1: one SDPA call per layer
def test_torch_export_matches_eager_on_a_padded_batch(iterations):
    tiny = _tiny("bert", iterations)
    with torch.no_grad():  # an inference export
        program = torch.export.export(tiny.model, (), kwargs=tiny.inputs)
        expected = tiny.model(**tiny.inputs).last_hidden_state
        torch.testing.assert_close(program.module()(**tiny.inputs).last_hidden_state, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize("family", ["bert", "vit"])
def test_onnx_runtime_matches_pytorch(tmp_path, family, iterations):
    # imported here, not at collection: ONNX Runtime takes seconds to import and only the slow tests need it
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    tiny = _tiny(family, iterations)
    batch = torch.export.Dim("batch")
    axes = {name: {0: batch} for name in tiny.inputs}
    if family == "bert":
        sequence = torch.export.Dim("sequence", max=64)
        axes = {name: {0: batch, 1: sequence} for name in tiny.inputs}
    with torch.no_grad():
        program = torch.onnx.export(tiny.model, (), kwargs=tiny.inputs, dynamo=True, dynamic_shapes=axes)
    program.save(tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    shorter = {name: tensor[:, :6] for name, tensor in tiny.inputs.items()} if family == "bert" else tiny.inputs
    for inputs in (tiny.inputs, shorter):  # the padded batch, then another length
        with torch.no_grad():
            expected = tiny.model(**inputs).last_hidden_state.numpy()
        got = session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-4
