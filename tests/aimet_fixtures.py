"""The AIMET 2.42 fixtures in tests/fixtures/aimet-2.42 (see its PROVENANCE.md): paths, AIMET-free loading of the
tensors AIMET pickled, the float models they were written for, and AIMET's ONNX graphs with their weights put back."""

from __future__ import annotations

import functools
import hashlib
import pickle
import types
from pathlib import Path

import onnx
import torch
import torchvision
from onnx import numpy_helper
from torch import nn

from edgequant.export import read_encodings
from edgequant.quantization.affine import quantize_dequantize

FIXTURES = Path(__file__).resolve().parent / "fixtures/aimet-2.42"
MOBILENET = FIXTURES / "mobilenet_v2_digits"


class _AimetStub:
    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        self.__dict__.update(state if isinstance(state, dict) else {})


class _AimetFreeUnpickler(pickle.Unpickler):
    """AIMET saved its outputs as its DequantizedTensor subclass; read them as plain tensors without aimet."""

    def find_class(self, module: str, name: str) -> object:
        if module.startswith("aimet_torch"):
            return torch.Tensor if name.endswith("Tensor") else _AimetStub
        return super().find_class(module, name)


def load_fixture_tensor(path: Path) -> torch.Tensor:
    pickle_module = types.SimpleNamespace(Unpickler=_AimetFreeUnpickler, load=pickle.load, __name__="pickle")
    return torch.load(path, pickle_module=pickle_module, weights_only=False).as_subclass(torch.Tensor)


class MobileNetV2Digits(nn.Module):
    """The float model of mobilenet_v2_digits/ (its README): torchvision's MobileNetV2 on 1-channel 16x16 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torchvision.models.mobilenet_v2(num_classes=10)
        self.net.features[0][0].stride = (1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.repeat(1, 3, 1, 1))


def mobilenet_float_state() -> dict[str, torch.Tensor]:
    return torch.load(MOBILENET / "float_state_dict.pt")


def mobilenet() -> MobileNetV2Digits:
    model = MobileNetV2Digits()
    model.load_state_dict(mobilenet_float_state())
    return model.eval()


def aimet_onnx_weights(encodings_path: Path, float_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights AIMET writes into its ONNX export: quantize-dequantize(weight) under the file's encoding for
    quantized parameters, the float value for the others (BatchNorm parameters and statistics, biases)."""
    _, entries = read_encodings(encodings_path)
    encodings = {e.name: e.encoding for e in entries if e.is_param is not False}
    weights = {}
    for name, value in float_state.items():
        encoding = encodings.get(name)
        if encoding is not None:
            scale, offset = encoding.broadcast_to(value.shape)
            value = quantize_dequantize(value, scale, offset, encoding.bitwidth)
        weights[name] = value
    return weights


def stored_without_weights(model: onnx.ModelProto, weights: dict[str, torch.Tensor]) -> onnx.ModelProto:
    """``model`` with the data of the initializers named in ``weights`` removed (names, dtypes and dims kept)."""
    for tensor in model.graph.initializer:
        if tensor.name in weights:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.ClearField("raw_data")
    return model


@functools.cache
def aimet_onnx_graph(folder: str) -> onnx.ModelProto:
    """AIMET's ONNX export in mobilenet_v2_digits/<folder> as AIMET wrote it: the stored copy's weights (removed
    to keep the repository small, PROVENANCE.md) are put back from the float weights and the encodings.
    Cached: callers must not modify it."""
    model = onnx.load(str(MOBILENET / folder / "model.onnx"))
    weights = aimet_onnx_weights(MOBILENET / folder / "model.encodings", mobilenet_float_state())
    for tensor in model.graph.initializer:
        if tensor.name in weights and not tensor.raw_data:
            tensor.CopyFrom(numpy_helper.from_array(weights[tensor.name].numpy(), tensor.name))
    return model


def initializer_digest(model: onnx.ModelProto) -> str:
    """sha256 over the names and values of all initializers, in graph order; values as numbers (-0.0 as 0.0:
    AIMET's quantize-dequantize writes +0.0 where edgequant's keeps the sign of a weight that rounds to zero)."""
    digest = hashlib.sha256()
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor)
        digest.update(tensor.name.encode())
        digest.update((values + 0 if values.dtype.kind == "f" else values).tobytes())
    return digest.hexdigest()


class BlockModel(nn.Module):
    """The float model of the per-block fixture (tests/fixtures/aimet-2.42/per_block, its README)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu, self.fc = nn.Conv2d(64, 16, 3), nn.ReLU(), nn.Linear(16 * 2 * 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.relu(self.conv(x)), 1))
