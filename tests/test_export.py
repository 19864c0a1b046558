"""torch.export and ONNX round trips match PyTorch within 1e-4; MSDA exports as grid_sample."""
import pytest
import torch

import proscale
from proscale.export import export_onnx, export_program, max_abs_diff_onnx, max_abs_diff_pt2

SIZE = (64, 96)


@pytest.fixture(scope="module", params=["m2f_tiny", "proscale_tiny_333"])
def model(request):
    torch.manual_seed(0)
    return proscale.build_model(request.param).eval()


def test_torch_export_matches(model, monkeypatch):
    # Even with a fast back end forced for eager runs, MSDeformAttn ("auto") exports its
    # grid_sample reference: standard operators only.
    monkeypatch.setenv("PROSCALE_MSDA", "fused")
    program = export_program(model, SIZE)
    assert "aten.grid_sampler" in str(program.graph)
    assert max_abs_diff_pt2(model, program, SIZE) <= 1e-4


def test_onnx_matches_onnxruntime(model, tmp_path):
    pytest.importorskip("onnxruntime")
    path = export_onnx(model, tmp_path / "model.onnx", SIZE, opset=17)
    import onnx

    proto = onnx.load(str(path))
    assert proto.opset_import[0].version >= 16
    assert any(node.op_type == "GridSample" for node in proto.graph.node)  # MSDA, as the ONNX standard op
    assert max_abs_diff_onnx(model, path, SIZE) <= 1e-4


def test_onnx_rejects_old_opset(model, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, tmp_path / "m.onnx", SIZE, opset=13)
