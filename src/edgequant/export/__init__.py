"""Export to ONNX (float model + AIMET encodings + QDQ model), encodings import, and sim-vs-runtime parity."""

from edgequant.export.bias import quantize_bias_int32
from edgequant.export.encodings_io import EncodingsFileError, TensorEncoding, read_encodings, write_encodings
from edgequant.export.load import LoadReport, load_encodings
from edgequant.export.onnx_export import ExportResult, export_onnx
from edgequant.sim.services import register_service

__all__ = [
    "EncodingsFileError",
    "ExportResult",
    "LoadReport",
    "TensorEncoding",
    "export_onnx",
    "load_encodings",
    "quantize_bias_int32",
    "read_encodings",
    "write_encodings",
]

register_service("export", export_onnx)
register_service("load_encodings", load_encodings)
