"""Integer-kernel emulation: the sim computes, op for op, what a named integer runtime computes.

The default sim fake-quantizes: a convolution runs in float32 on dequantized values and its output is divided
by the output scale and rounded. An integer runtime instead accumulates ``Σ q_x·q_w`` exactly in int32, adds an
int32 bias and *requantizes* the accumulator with its own arithmetic (multiplier precision, rounding, clamping).
Ties and float32 rounding then break differently (≤ 1 LSB per layer), and the differences compound through deep
networks and residual adds. In emulation mode (``sim.emulate("onnxruntime")``) every op the runtime fuses into
an integer kernel is replaced by an *emulating* forward that recovers the integer grid indices of its inputs,
accumulates them exactly and requantizes with the arithmetic of a `RuntimeModel`:

* `OnnxRuntimeCPU` (``"onnxruntime"``): ONNX Runtime's CPU (MLAS, x86-64) kernels, read from its sources
  (``mlas/lib/requantize``, ``qladd``/``intrinsics/avx2/qladd_avx2.cpp``, ``qlgavgpool.cpp``) and checked
  against ORT 1.32 output for output:

  - QLinearConv / QGemm / QLinearMatMul: ``acc = Σ (q_x - z_x)(q_w - z_w) + bias_int32``;
    ``bias_int32 = round_half_even(b / fl32(s_x·s_w))`` (ORT quantizes a float bias itself, with this
    formula, when it fuses ``DQ→Conv→Q``; a quotient outside int32, as on a dead channel whose weight scale
    sits at the floor under a large bias, becomes INT32_MIN whatever its sign, and the int32 accumulator wraps
    around); ``y = sat(rne(fl32(fl32(acc) · M)) + z_y)`` with the float32 multiplier
    ``M = fl32(fl32(s_x·s_w) / s_y)`` (per output channel for per-channel weights).
  - A Linear on inputs of rank > 2 is exported as MatMul + Add, which ORT does not fuse into QGemm: with a bias
    MatMulIntegerToFloat (``fl32(fl32(acc) · fl32(s_x·s_w))``), a float32 Add of the bias and QuantizeLinear
    (``rne(v / s_y)``); without one QLinearMatMul, requantized as QGemm.
  - QLinearAdd (8-bit, AVX2 kernel): ``r_a = fl32(s_a/s_c)``, ``r_b = fl32(s_b/s_c)``,
    ``c = fl32(z_c - fma(r_a, z_a, fl32(r_b·z_b)))``, then ``y = sat(rne(fma(q_a, r_a, fma(q_b, r_b, c))))``.
    Broadcast operands (a squeeze-excitation's ``[N, C, 1, 1]``): ORT's broadcaster hands the kernel one
    scalar per span, always as ``b``, so where the first operand is the scalar the two swap roles.
  - QLinearMul (SSE2 kernel): ``y = sat(rne(fl32(fl32(fl32((q_a - z_a)(q_b - z_b)) · fl32(s_a·s_b/s_c)) + z_c)))``,
    broadcast alike (the formula is symmetric).
  - QLinearAveragePool: float32 sum of the dequantized window in row-major order, divided by the count,
    ``y = sat(rne(fl32(y / s_y) + z_y))``. With ``count_include_pad`` the count is the whole kernel, also for
    a ``ceil_mode`` window that runs past the padding (PyTorch divides by the part inside the padded input
    there: on those positions ORT's output differs from the PyTorch model's, and the emulation follows ORT).
  - QLinearConcat, QLinearLeakyRelu: 256-entry tables ``rne(f(fl32(s_x·k)) / s_y)`` (true division), i.e. the
    sim's quantizer applied to the float32 op on dequantized inputs, which is how they are emulated.
  - A constant zero ``Pad`` (``nn.ZeroPad2d``, ``F.pad``) whose only consumer is a convolution is folded into
    the convolution's pads by ORT (PadFusion) and the QLinearConv pads with the zero point: the convolution
    reads the grid of the padded tensor, and is emulated as usual. A Pad with its own quantizer stays a float
    Pad between Q/DQ in ORT, exact in both.
  - QLinearSigmoid: a 256-entry table of MLAS's own logistic (Eigen's rational approximation, FMA3 kernel),
    quantized with a true division; emulated as that logistic followed by the sim's output quantizer.
  - QLinearGlobalAveragePool: ``acc = Σ q - z_x·N``, requantized as above with
    ``M = fl32(s_x / fl32(s_y · N))``.
  - QLinearSoftmax (uint8): a float32 table ``e[d] = fl32(exp((d + shift)·s_x))`` of the distance ``d`` of each
    level to its row's maximum (``shift = max(0, logf(fl32(FLT_MAX / D)) - 5) / s_x`` keeps the sum below
    FLT_MAX), a float32 sum in order along the axis, ``y = min(nearbyint(e·floor(1/s_y) / sum) + z_y, 255)`` on
    the exact quotient (neither product nor quotient rounded to float32: ORT's binary, checked output for
    output): the output scale is read as ``1/floor(1/s_y)``, which PyTorch's softmax does not know.
  - HardSigmoid, HardSwish and SiLU stay float between DQ and Q in ORT, with formulas of their own:
    HardSigmoid ``clip(fl32(x · fl32(1/6)) + 0.5, 0, 1)``, HardSwish as the ONNX function body (that times
    ``x``), SiLU exported as Sigmoid (MLAS's logistic, above) and Mul. Emulated as those formulas followed by the
    sim's output quantizer (PyTorch's HardSwish and SiLU round a few levels otherwise, mostly at tiny scales).
  - LayerNormalization stays float between DQ and Q, in its own order: the mean summed in double and rounded,
    ``d = fl32(x - mean)``, ``Σd²`` in 8 float32 FMA lanes added pairwise, ``inv = 1/sqrtf(Σd²/n + eps)``,
    ``y = fma(fl32(d·inv), scale, bias)`` (a third of its float outputs differ from PyTorch's ``layer_norm`` in the
    last bit; on BERT that flipped about one 8-bit output in a few million, and the next layers spread it).
    Emulated for a length that is a multiple of 8, followed by the sim's output quantizer. torchvision's
    channels-first ``LayerNorm2d`` (ConvNeXt: permute, ``layer_norm``, permute back) is exported as Transpose,
    LayerNormalization, Transpose, which ORT's layout optimizer folds into its NHWC neighbours: the same kernel
    on each position's channels, emulated alike.
  - GELU (exact, erf) is exported as ``Div(x, fl32(√2))``, Erf, Add 1, ``Mul(x, ·)``, Mul 0.5, float between DQ
    and Q: the QDQ export gives each consumer of ``x`` its own DQ, so ORT's GeluFusion leaves the five ops apart.
    All correctly rounded float32 steps but Erf, MLAS's own (``MlasComputeErf``: ``x86_64/ErfKernelFma3.S`` with
    the constants of ``erf.cpp``): on ``a = min(|x|, 3.925)`` a degree-5 FMA polynomial in ``a²`` below 0.921875,
    above ``1 - exp(-fma(Q(a), a, a))`` with a degree-6 FMA exp polynomial, the sign of ``x`` (bit-identical to
    ORT 1.32's Erf; PyTorch's erf differs in the last bit on one value in eight). Emulated as that formula on
    the input grid's levels, a table, followed by the sim's output quantizer.
  - Llama's RMSNorm (``edgequant.llm``'s RMSNormalization) is exported as Pow, ReduceMean, Add eps, Sqrt,
    ``Div(1, ·)``, Mul, Mul by the dequantized scale, float between DQ and Q; ORT's DivMulFusion makes it
    ``x / sqrt``. All correctly rounded float32 steps except ReduceMean's sum, Eigen's ``sum()`` on SSE packets
    (``core/providers/cpu/reduction``): two 4-lane accumulators over alternate packets, added, an odd last
    packet added, lanes ``(l0+l2) + (l1+l3)``; then divided by the length. Emulated for lengths that are a
    multiple of 4 (PyTorch's ``x·rsqrt`` and its mean round some float outputs otherwise).
  - The decoder's masked softmax (``softmax(scores + mask)``) is exported as a float Add of the mask and a float
    Softmax between DQ and Q (no QLinearSoftmax): MLAS's softmax on AVX-512F (``TransKernelAvx512F.S``): the
    row's maximum, MLAS's own exp of ``fl32(x - max)`` (``m = round(x/ln2)`` by the 1.5·2²³ trick, a two-step
    FMA range reduction, a degree-6 FMA polynomial, ``vscalefps``), summed in 16 lanes (element i into lane
    i mod 16) reduced as ``((s0+s1)+(s2+s3)) + ((s4+s5)+(s6+s7))`` with ``s_l = l_{l+8} + l_l``, each
    exponential times ``fl32(1/sum)``. CPUs without AVX-512F run MLAS's AVX/FMA3 kernels, whose lanes differ.
  - ConvTranspose (2-D) stays float between DQ and Q (``cpu/nn/conv_transpose.cc``): per group an MLAS SGEMM
    ``col = W^T·X`` on the dequantized tensors (each slice of 128 input channels an FMA chain from zero, the
    slices added in order), ``Col2im`` adding each kernel tap's column into the zeroed output in row-major tap
    order, then the bias: ORT's BiasQuantization has made it ``fl32(fl32(bias_int32) · fl32(s_x·s_w))`` with
    the int32 bias above (a float bias where groups leave fewer weight scales than channels). Emulated as that
    float32 arithmetic followed by the sim's output quantizer (a 1×1 input takes MLAS's M = 1 kernel: default).
  - Resize (``F.interpolate``, ``nn.Upsample``; 2-D nearest and bilinear) stays float between DQ and Q
    (``cpu/tensor/upsample.h``), except a nearest one between equal grids, which runs on uint8 (the same copy).
    Nearest reads ``floor(fl32(y / scale))`` ("asymmetric", "floor" as exported); bilinear maps each output
    position to ``fl32(fl32(y + 0.5) / scale) - 0.5`` ("half_pixel"; ``align_corners``: ``y·(in-1)/(out-1)``),
    clamps it, takes ``d1 = |c - i1|``, ``d2 = |c - i2|`` (both 0.5 at the border) and sums
    ``(dx2·dy2)·X11 + (dx1·dy2)·X21 + (dx2·dy1)·X12 + (dx1·dy1)·X22`` left to right in float32, with the scales
    the export writes (the scale factors, or ``out/in`` where it writes sizes). PyTorch lerps twice, which
    rounds some output levels otherwise.
  - A Linear on grids without an integer kernel (16-bit activations) is exported as weight DQ, Transpose and
    MatMul: ORT fuses a per-channel or per-tensor weight's DQ into MatMulNBits (accuracy level 1: a 4-bit weight
    one FMA chain, an 8-bit one dequantized into an SGEMM with B transposed), and leaves a blocked weight's a
    float MatMul with B transposed. Where the MatMul writes straight into a Q of another width than its input's
    (a 16-bit ``v_proj`` writing an 8-bit KV cache) ORT does not fuse it: the MatMul reads the dequantized weight
    as ``[K, N]``, and a single row (a decoding step) takes MLAS's plain M = 1 kernel (`WeightPath`).
  - A Linear whose input is indexed with an integer after its producer's DQ (ViT's class token, BERT's pooler:
    ``x[:, 0]``) reads a Gather's float output, so ORT runs it as a float Gemm (``cpu/math/gemm.cc``): the bias
    broadcast into the output, then an MLAS SGEMM with beta = 1 adds each reduction slice's FMA chain (the slices
    above) to it, the weight as its DQ gives it. Emulated as that followed by the sim's output quantizer (a single
    row takes MLAS's M1 kernel: default). A Concat with a float constant among its inputs (ViT's class token) and
    products by numbers the graph computes from shapes are float in ORT as in the sim: not candidates. An op
    reading the output of a function fx does not trace into (Swin's window attention) or of an
    ``nn.MultiheadAttention`` the sim leaves in float (one with ``add_bias_kv`` or ``add_zero_attn``; others are
    quantized ops: `edgequant.sim.multihead_attention`) is reported as not emulated: both are float in the sim and
    in ORT, whose float kernels in there are not modelled. torchvision's ``Permute``
    module moves data: ORT moves its Transpose past the QLinearGlobalAveragePool after it, which reads the grid
    before it.
  - A ReLU / ReLU6 between the op and its output quantizer is removed by ORT when the output grid already
    clamps it (ReLU: zero point at the grid's lowest value; Clip: the clip range covers the grid); those are
    emulated as part of the fused op. Otherwise ORT keeps the op in float and so does the emulating sim.

* `FixedPointRequantization` (``"fixed-point"``): the integer-only requantization of DSP/NPU toolchains
  (gemmlowp / TFLite reference kernels): an int32 multiplier in Q0.31 and a right shift, rounding half away
  from zero, and TFLite's fixed-point add. It plugs into the same emulated ops and shows how another runtime's
  requantization is modelled; it is not checked against a particular device.

What stays approximate (computed by the default fake-quantized path even in emulation mode), and why:

* integer ops whose grids are not 8-bit, or whose input no quantizer is known to produce: ORT does not fuse them
  the same way, or the sim does not know which grid the runtime sees (the float ops above are emulated on any
  grid: ORT computes them between DQ and Q whatever the bits; at 16 bits ORT fuses an 8-bit weight's DQ and
  MatMul into MatMulNBits, which quantizes the activations to 8 bits by default, ``accuracy_level`` 4: not
  modelled). Where a model is traced piece by piece (Hugging
  Face's BERT: each layer's dense blocks are graphs of their own, the attention an untraced module with
  intercepted ops), one run of the dummy input tells which quantizer produced each input (`provenance`);
* ops ORT leaves in float between Q/DQ pairs (MaxPool, Flatten, Transpose: exact in both; the tanh GELU and
  other float ops: float in ORT too, so the default sim's float32 math is already the runtime's, up to op order),
  a LayerNorm whose length is not a multiple of 8 or that normalises more than the last axis (or the channels of
  torchvision's ``LayerNorm2d``);
* a softmax on a signed (int8) grid, average pools with a ``divisor_override``, 1-D/3-D ConvTranspose, other
  Resize modes (bicubic, area, antialiased);
* on CPUs without AVX-512 VNNI / AVX-VNNI, ORT's u8s8 kernels use ``vpmaddubsw``, whose int16 pair sums
  saturate for large operands; the emulation accumulates exactly (as VNNI CPUs and ARM do).

`sim.emulate` warns in one line when an op the runtime computes in integer is not emulated (the share covered and
the first ones; ``plan.coverage()``), and ``plan.summary()`` gives every reason.

Emulation is for evaluation: it computes under ``no_grad`` and falls back to the default path while the sim
calibrates, while a quantizer involved is disabled or uncalibrated, and during ONNX export.

The package is split by concern: `arithmetic` (each runtime's integer math), `kernels` (one `KERNELS` entry
per emulated op), `planning` (which ops are emulated, and why not), `provenance` (the quantizer behind each input
where no fx graph says) and `installation` (the emulating forwards).
"""

from edgequant.sim.emulation.arithmetic import (
    INT32_MAX,
    INT32_MIN,
    RUNTIME_MODELS,
    FixedPointRequantization,
    Grid,
    OnnxRuntimeCPU,
    RuntimeModel,
    mlas_logistic,
    quantize_multiplier,
    runtime_model,
)
from edgequant.sim.emulation.installation import install, uninstall
from edgequant.sim.emulation.kernels import KERNELS, Interpolation, Kernel
from edgequant.sim.emulation.kernels import _average_pool as _average_pool
from edgequant.sim.emulation.planning import EmulatedOp, EmulationPlan, plan_emulation

__all__ = [
    "INT32_MAX", "INT32_MIN", "KERNELS", "RUNTIME_MODELS", "EmulatedOp", "EmulationPlan", "FixedPointRequantization",
    "Grid", "Interpolation", "Kernel", "OnnxRuntimeCPU", "RuntimeModel", "install", "mlas_logistic", "plan_emulation",
    "quantize_multiplier", "runtime_model", "uninstall",
]
