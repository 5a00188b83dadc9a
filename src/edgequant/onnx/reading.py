"""Reading a user's ONNX file: one clear line for what is not a valid ONNX model; the file is never written."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx.external_data_helper


class OnnxModelError(ValueError):
    """An ONNX model edgequant cannot read or convert (the message names the file or node and what to do)."""


def read_onnx(path: str | Path) -> tuple[onnx.ModelProto, bool]:
    """Load and check ``path``; also says whether its tensors were in external-data files (read from beside it)."""
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"ONNX model {str(path)!r} does not exist")
    try:
        model = onnx.load(path, load_external_data=False)
        external = uses_external_data(model)
        if external:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except Exception as error:  # noqa: BLE001 - protobuf raises DecodeError and others on non-ONNX bytes
        raise OnnxModelError(
            f"{str(path)!r} is not an ONNX model ({type(error).__name__}); pass a .onnx file written by an ONNX "
            "exporter"
        ) from None
    if not model.graph.node:
        raise OnnxModelError(f"{str(path)!r} holds no ONNX graph; pass a .onnx file written by an ONNX exporter")
    try:
        onnx.checker.check_model(str(path))  # by path: checks models over 2 GB with their external data
    except onnx.checker.ValidationError as error:
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise OnnxModelError(
            f"ONNX model {str(path)!r} fails onnx.checker ({first}); fix or re-export the model"
        ) from None
    return model, external


def uses_external_data(model: onnx.ModelProto) -> bool:
    """Whether ``model`` (as read, before loading external data) keeps tensors in files beside it."""
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
