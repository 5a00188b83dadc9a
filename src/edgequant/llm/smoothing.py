"""Per-channel scales moved between a layer and the Linears it feeds, before quantization: SmoothQuant and AWQ.

A Llama decoder layer has four places where a per-input-channel scale ``s`` can be folded exactly: the RMSNorm
before q/k/v (``input_layernorm``) and before gate/up (``post_attention_layernorm``) multiply their output by their
weight, so dividing that weight by ``s`` and multiplying the following Linears' weight columns by ``s`` leaves the
float function unchanged; so does dividing the output rows of ``v_proj`` (the attention output is a weighted sum of
values) or of ``up_proj`` (the SiLU gate multiplies it elementwise) and multiplying the input columns of ``o_proj``
or ``down_proj``. Where QuaRot's R4 rotates down_proj's input online (``(x·H)·(W·H)ᵀ``), the scale acts before the
rotation: up_proj's rows are divided by ``s`` and down_proj's weight becomes ``W·diag(s)·H``, so that a channel
outlier of the product (an attention sink's, thousands against tens) is divided away before H spreads it over
every channel of the token.

Under grouped-query attention ``o_proj``'s input channel ``h * head_dim + d`` holds query head
``h``, which reads key/value head ``h // groups``: its scale is that of ``v_proj`` row ``(h // groups) * head_dim +
d``.

* SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
  Models") divides activation outliers away for 8-bit activations: ``s_j = max|X_j|^α / max|W_:,j|^(1-α)``.
* AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration") protects
  the weight columns that meet large activations for weight-only quantization: ``s_j = mean|X_j|^α``, α chosen on
  a grid by the output error of the quantized weights.

Both gather the inputs of each decoder layer's Linears with hooks, one sequence at a time and one decoder layer per
pass over the calibration ids (the pass stops after that layer), so that only one layer's activations are held.
Since the scaling is exact in float, the layers already scaled do not change the inputs of the next ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from edgequant.llm.rotation import RotatedInputMlp
from edgequant.quantization import quantize_dequantize
from edgequant.quantization.encoding import grid_from_range


@dataclass(frozen=True)
class SmoothingSettings:
    """How `smooth_causal_lm` chooses its scales. ``alpha`` is the migration strength (0: weights take all the
    scaling, 1: activations become flat); None searches each group's α over ``alpha_grid`` by the output error of
    its Linears with ``activation_bw``-bit per-tensor activations and ``weight_bw``-bit weights with one scale per
    output channel and block of ``weight_block_size`` input features (None: per channel; min-max, fake-quantized),
    and leaves a group unscaled where no α lowers that error (4-bit weights can lose more than the activations
    gain). The activations it quantizes are the Linears' inputs, on the grid the sim gives a Linear's
    input in the ``w4a8`` recipes (``Recipe.linear_input_bw``: asymmetric, per tensor, min-max): the norms' outputs
    into q/k/v and gate/up, and with ``attention_output`` and ``mlp_down`` also the inputs of o_proj and down_proj
    (v_proj → o_proj, up_proj → down_proj; the paper smooths only the inputs that follow a norm)."""

    alpha: float | None = 0.5
    alpha_grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    weight_block_size: int | None = None
    attention_output: bool = False
    mlp_down: bool = False
    activation_bw: int = 8
    weight_bw: int = 8
    progress: bool = True

    def __post_init__(self) -> None:
        alphas = self.alpha_grid if self.alpha is None else (self.alpha,)
        if not alphas or not all(0.0 <= a <= 1.0 for a in alphas):
            raise ValueError(f"alpha and the alpha_grid must lie in [0, 1], got alpha={self.alpha}, "
                             f"alpha_grid={self.alpha_grid}")
        if self.activation_bw < 2 or self.weight_bw < 2:
            raise ValueError(f"bitwidths must be >= 2, got activation_bw={self.activation_bw}, "
                             f"weight_bw={self.weight_bw}")
        if self.weight_block_size is not None and self.weight_block_size < 1:
            raise ValueError(f"weight_block_size must be None or >= 1, got {self.weight_block_size}")


@dataclass(frozen=True)
class AwqSettings:
    """The weight grid `awq_causal_lm` scales for: symmetric ``bits``-bit weights with one min-max scale per block
    of ``block_size`` input features (None: per output channel). α is searched over ``grid_points`` values
    ``i / grid_points``, ``i = 0 .. grid_points - 1`` (α = 0 is no scaling), as the paper's code does.
    ``attention_output`` and ``mlp_down`` also scale v_proj → o_proj and up_proj → down_proj."""

    bits: int = 4
    block_size: int | None = 64
    grid_points: int = 20
    attention_output: bool = True
    mlp_down: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.bits < 2:
            raise ValueError(f"bits must be >= 2, got {self.bits}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be None or >= 1, got {self.block_size}")
        if self.grid_points < 1:
            raise ValueError(f"grid_points must be >= 1, got {self.grid_points}")


@dataclass(frozen=True)
class ScaledGroup:
    """One producer (an RMSNorm, v_proj or up_proj, by module name) and the Linears it feeds: the α chosen (None:
    left unscaled, no α of the search lowered the error), the range of the scales folded in, and the relative
    output error ``||Y_q - Y||² / ||Y||²`` of those Linears on the calibration inputs before and after scaling (what
    the method minimises: the grids of its `SmoothingSettings` for SmoothQuant, the weight grid for AWQ)."""

    name: str
    consumers: tuple[str, ...]
    alpha: float | None
    scale_min: float
    scale_max: float
    error_before: float
    error_after: float


@dataclass(frozen=True)
class _ScalingReport:
    groups: tuple[ScaledGroup, ...]
    tokens: int
    seconds: float

    def summary(self) -> str:
        lines = [f"{'group':<44} {'alpha':>6} {'scale min':>10} {'scale max':>10} {'err before':>11} {'err after':>11}"]
        for g in self.groups:
            alpha = "none" if g.alpha is None else f"{g.alpha:.2f}"
            lines.append(f"{g.name:<44} {alpha:>6} {g.scale_min:>10.4g} {g.scale_max:>10.4g} "
                         f"{g.error_before:>11.4g} {g.error_after:>11.4g}")
        lines.append(f"{self.tokens} calibration tokens, {self.seconds:.2f} s")
        return "\n".join(lines)


@dataclass(frozen=True)
class SmoothingReport(_ScalingReport):
    """What `smooth_causal_lm` did; errors are those of the fake quantization of its `SmoothingSettings`."""


@dataclass(frozen=True)
class AwqReport(_ScalingReport):
    """What `awq_causal_lm` did; errors are those of the weight grid of its `AwqSettings`."""


def smooth_causal_lm(model: nn.Module, calibration_ids: torch.Tensor,
                     settings: SmoothingSettings = SmoothingSettings()) -> SmoothingReport:
    """SmoothQuant on a Llama-family causal LM, IN PLACE (pass a copy to keep the original): per group, activation
    outliers are divided into the producer and multiplied into the Linears' weight columns, so that 8-bit per-tensor
    activations lose less. The float function is unchanged. ``calibration_ids`` is a LongTensor ``[N, T]``."""
    alphas = (None, *settings.alpha_grid) if settings.alpha is None else (settings.alpha,)

    def scales(group: _Group, inputs: torch.Tensor, alpha: float | None) -> torch.Tensor:
        if alpha is None:  # the search's option of no scaling
            return inputs.new_ones(group.size)
        activation = group.reduce(inputs.abs().amax(0), "amax").clamp_min(1e-5)
        weight = group.reduce(torch.cat(group.consumer_weights()).abs().amax(0), "amax").clamp_min(1e-5)
        return (activation.pow(alpha) / weight.pow(1.0 - alpha)).clamp_min(1e-5)

    def error(group: _Group, inputs: torch.Tensor, scale: torch.Tensor) -> float:
        return _relative_error(group, inputs, scale, settings.weight_bw, settings.weight_block_size,
                               settings.activation_bw)

    groups, tokens, seconds = _scale_groups(model, calibration_ids, alphas, scales, error, settings.attention_output,
                                            settings.mlp_down, settings.progress, "smoothquant")
    return SmoothingReport(groups, tokens, seconds)


def awq_causal_lm(model: nn.Module, calibration_ids: torch.Tensor, settings: AwqSettings = AwqSettings()
                  ) -> AwqReport:
    """AWQ scaling of a Llama-family causal LM for weight-only quantization, IN PLACE (pass a copy to keep the
    original): per group, the weight columns that meet large activations are scaled up before rounding (their
    relative rounding error shrinks) and the inverse folded into the producer. The float function is unchanged.
    ``calibration_ids`` is a LongTensor ``[N, T]``."""
    alphas = tuple(i / settings.grid_points for i in range(settings.grid_points))

    def scales(group: _Group, inputs: torch.Tensor, alpha: float) -> torch.Tensor:
        scale = group.reduce(inputs.abs().mean(0), "mean").pow(alpha).clamp_min(1e-4)
        return scale / (scale.max() * scale.min()).sqrt()

    def error(group: _Group, inputs: torch.Tensor, scale: torch.Tensor) -> float:
        return _relative_error(group, inputs, scale, settings.bits, settings.block_size, None)

    groups, tokens, seconds = _scale_groups(model, calibration_ids, alphas, scales, error, settings.attention_output,
                                            settings.mlp_down, settings.progress, "awq")
    return AwqReport(groups, tokens, seconds)


# -- groups and folding ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Group:
    """A producer of ``size`` channels and the Linears reading them; ``channels`` maps each consumer input channel
    to its producer channel (None: the same index); ``rotation``: the orthogonal H of an online rotation between
    them (R4: the consumers read ``x·H`` and their weights are stored as ``W·H``), None where there is none."""

    name: str
    producer: nn.Module
    consumers: tuple[nn.Linear, ...]
    consumer_names: tuple[str, ...]
    size: int
    channels: torch.Tensor | None = None
    rotation: torch.Tensor | None = None

    def reduce(self, values: torch.Tensor, how: str) -> torch.Tensor:
        """Per-consumer-input-channel ``values`` reduced (``"amax"`` or ``"mean"``) to the producer's channels."""
        if self.channels is None:
            return values
        channels = self.channels.to(values.device)
        return values.new_zeros(self.size).scatter_reduce(0, channels, values, how, include_self=False)

    def expand(self, scale: torch.Tensor) -> torch.Tensor:
        """A producer-channel ``scale`` laid out on the consumers' input channels."""
        return scale if self.channels is None else scale[self.channels.to(scale.device)]

    def rotated(self, matrix: torch.Tensor) -> torch.Tensor:
        """``matrix`` (rows on the producer's channels) as the consumers read it: ``matrix·H`` under a rotation."""
        return matrix if self.rotation is None else matrix @ self.rotation.to(matrix)

    def unrotated(self, matrix: torch.Tensor) -> torch.Tensor:
        """``matrix`` as the consumers read it (``M·H``) back on the producer's channels: ``M·H·Hᵀ``."""
        return matrix if self.rotation is None else matrix @ self.rotation.to(matrix).T

    def consumer_weights(self, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """The consumers' weights on the producer's channels (``W``, the rotation ``W·H`` undone), in ``dtype``."""
        return [self.unrotated(consumer.weight.detach().to(dtype)) for consumer in self.consumers]

    def fold(self, scale: torch.Tensor) -> None:
        """Divide the producer's output channels by ``scale`` and multiply the consumers' input columns by it (under
        a rotation, before it: ``W·diag(s)·H``)."""
        with torch.no_grad():
            expanded = self.expand(scale)
            if self.rotation is None:
                for consumer in self.consumers:
                    consumer.weight.mul_(expanded.to(consumer.weight.dtype))
            else:
                for consumer, weight in zip(self.consumers, self.consumer_weights(torch.float64), strict=True):
                    consumer.weight.copy_(self.rotated(weight * expanded.double()).to(consumer.weight.dtype))
            weight = self.producer.weight
            if isinstance(self.producer, nn.Linear):
                weight.div_(scale.to(weight.dtype)[:, None])
                if self.producer.bias is not None:
                    self.producer.bias.div_(scale.to(self.producer.bias.dtype))
            else:
                weight.div_(scale.to(weight.dtype))


def _decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = [(name, m) for name, m in model.named_modules()
              if all(hasattr(m, p) for p in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp"))
              and all(hasattr(m.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"))
              and all(hasattr(m.mlp, p) for p in ("gate_proj", "up_proj", "down_proj"))]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Llama-family decoder layer (input_layernorm, self_attn with "
                         "q/k/v/o_proj, post_attention_layernorm, mlp with gate/up/down_proj)")
    return layers


def _layer_groups(name: str, layer: nn.Module, attention_output: bool, mlp_down: bool) -> list[_Group]:
    attention, mlp = layer.self_attn, layer.mlp

    def group(producer: str, owner: str, consumers: tuple[str, ...], size: int,
              channels: torch.Tensor | None = None, rotation: torch.Tensor | None = None) -> _Group:
        return _Group(f"{name}.{producer}", layer.get_submodule(producer),
                      tuple(layer.get_submodule(f"{owner}.{c}") for c in consumers),
                      tuple(f"{name}.{owner}.{c}" for c in consumers), size, channels, rotation)

    hidden = layer.input_layernorm.weight.numel()
    groups = [group("input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj"), hidden)]
    if attention_output:
        head_dim = attention.head_dim
        values, queries = attention.v_proj.out_features, attention.q_proj.out_features
        per_kv_head = queries // values  # query heads reading each key/value head
        channel = torch.arange(queries)
        kv_channel = channel // (head_dim * per_kv_head) * head_dim + channel % head_dim
        groups.append(group("self_attn.v_proj", "self_attn", ("o_proj",), values,
                            None if per_kv_head == 1 else kv_channel))
    groups.append(group("post_attention_layernorm", "mlp", ("gate_proj", "up_proj"), hidden))
    if mlp_down:
        rotation = mlp.down_rotation.matrix if isinstance(mlp, RotatedInputMlp) else None
        groups.append(group("mlp.up_proj", "mlp", ("down_proj",), mlp.up_proj.out_features, rotation=rotation))
    return groups


# -- statistics and search --------------------------------------------------------------------------------------
class _LayerDone(Exception):
    """Raised once the decoder layer of interest has run: the rest of the model need not."""


def _layer_inputs(model: nn.Module, layer: nn.Module, groups: list[_Group], ids: torch.Tensor) -> list[torch.Tensor]:
    """For each group, the float32 inputs ``[tokens, in_features]`` of its consumers over all calibration ids, on
    the producer's channels (an online rotation undone)."""
    captured: list[list[torch.Tensor]] = [[] for _ in groups]

    def keep(index: int):  # noqa: ANN202 - a hook factory
        def hook(module: nn.Module, args: tuple) -> None:
            captured[index].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
        return hook

    def stop(module: nn.Module, args: tuple, output: object) -> None:
        raise _LayerDone

    device = groups[0].consumers[0].weight.device
    handles = [g.consumers[0].register_forward_pre_hook(keep(i)) for i, g in enumerate(groups)]
    handles.append(layer.register_forward_hook(stop))
    try:
        for sequence in ids:
            try:
                model(sequence[None].to(device), use_cache=False)
            except _LayerDone:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return [group.unrotated(torch.cat(tensors)) for tensors, group in zip(captured, groups, strict=True)]


def _relative_error(group: _Group, inputs: torch.Tensor, scale: torch.Tensor, weight_bw: int,
                    block_size: int | None, activation_bw: int | None) -> float:
    """``||Q_a(X / s) Q_w(W diag(s))ᵀ - X Wᵀ||² / ||X Wᵀ||²`` summed over the group's consumers: symmetric min-max
    ``weight_bw``-bit weights per block of ``block_size`` input features (None: per output channel), asymmetric
    min-max per-tensor ``activation_bw``-bit activations (None: float). With float activations this is AWQ's
    ``Q(W diag(s)) diag(s)⁻¹ X``. Under a rotation H both are what the consumers read: ``Q_a((X / s)·H)`` and
    ``Q_w(W diag(s)·H)``."""
    expanded = group.expand(scale)
    scaled = group.rotated(inputs / expanded)
    if activation_bw is not None:
        scaled = _fake_quantize(scaled.reshape(1, -1), activation_bw, None, symmetric=False).reshape(scaled.shape)
    error, total = 0.0, 0.0
    for weight in group.consumer_weights():
        reference = inputs @ weight.T
        quantized = scaled @ _fake_quantize(group.rotated(weight * expanded), weight_bw, block_size, symmetric=True).T
        error += float((quantized - reference).square().sum())
        total += float(reference.square().sum())
    return error / max(total, 1e-30)


def _fake_quantize(matrix: torch.Tensor, bits: int, block_size: int | None, *, symmetric: bool) -> torch.Tensor:
    """``matrix`` [rows, columns] fake-quantized with one min-max scale per row and block of ``block_size`` columns
    (None: per row), on the sim's grid (`edgequant.quantization.encoding`)."""
    rows, columns = matrix.shape
    block = columns if block_size is None else block_size
    if columns % block:
        raise ValueError(f"{columns} input features do not divide into blocks of {block}; choose a block size that "
                         f"divides {columns}")
    blocks = matrix.reshape(rows, columns // block, block)
    scale, offset = grid_from_range(blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True), bits, symmetric)
    return quantize_dequantize(blocks, scale, offset, bits).reshape(rows, columns)


def _scale_groups(model: nn.Module, ids: torch.Tensor, alphas: tuple[float | None, ...],
                  scales: Callable[[_Group, torch.Tensor, float | None], torch.Tensor],
                  error: Callable[[_Group, torch.Tensor, torch.Tensor], float], attention_output: bool,
                  mlp_down: bool, progress: bool, desc: str) -> tuple[tuple[ScaledGroup, ...], int, float]:
    """For every decoder layer and group: the inputs, ``scales`` for each α, the α of least ``error`` (the first on
    ties), folded in. Returns the groups' records, the token count and the seconds taken."""
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or not ids.numel():
        raise ValueError(f"calibration_ids must be a LongTensor [N, T] of token ids with N, T >= 1, got {ids.dtype} "
                         f"{list(ids.shape)}")
    start = time.perf_counter()
    records = []
    with torch.no_grad():
        for name, layer in tqdm(_decoder_layers(model), desc=desc, disable=not progress, leave=False):
            groups = _layer_groups(name, layer, attention_output, mlp_down)
            for group, inputs in zip(groups, _layer_inputs(model, layer, groups, ids.long()), strict=True):
                before = error(group, inputs, inputs.new_ones(group.size))
                best, alpha, scale = before, None, None
                for candidate in alphas:
                    candidate_scale = scales(group, inputs, candidate)
                    candidate_error = error(group, inputs, candidate_scale)
                    if scale is None or candidate_error < best:
                        best, alpha, scale = candidate_error, candidate, candidate_scale
                group.fold(scale)
                records.append(ScaledGroup(group.name, group.consumer_names, alpha, float(scale.min()),
                                           float(scale.max()), before, best))
    return tuple(records), ids.numel(), time.perf_counter() - start
