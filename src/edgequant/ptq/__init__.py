"""Post-training quantization techniques, each usable on its own (see each module's docstring)."""

from edgequant.ptq.adaround import AdaRoundSettings, adaround
from edgequant.ptq.batch_norm_fold import fold_batch_norms, fold_batch_norms_to_scale
from edgequant.ptq.bias_correction import BiasCorrectionReport, correct_bias
from edgequant.ptq.bn_reestimation import BatchNormReestimation, reestimate_bn
from edgequant.ptq.channel_clamp import ChannelClamp
from edgequant.ptq.cross_layer_equalization import EqualizationReport, PairOutcome, equalize

__all__ = [
    "AdaRoundSettings",
    "BatchNormReestimation",
    "BiasCorrectionReport",
    "ChannelClamp",
    "EqualizationReport",
    "PairOutcome",
    "adaround",
    "correct_bias",
    "equalize",
    "fold_batch_norms",
    "fold_batch_norms_to_scale",
    "reestimate_bn",
]
