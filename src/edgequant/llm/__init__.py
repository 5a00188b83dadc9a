"""Language models on fixed-point hardware: causal LMs in the sim, their evaluation and their techniques."""

from edgequant.llm.block_calibration import BlockCalibrationReport, BlockCalibrationSettings, calibrate_by_block
from edgequant.llm.evaluation import (
    GenerationMatch,
    TokenAgreement,
    generation_match,
    greedy_generate,
    next_token_agreement,
    perplexity,
)
from edgequant.llm.export import (
    ORT_SESSION_CONFIG,
    CausalLmExport,
    cache_names,
    causal_mask,
    export_causal_lm,
    load_causal_lm_encodings,
    onnxruntime_generate,
    onnxruntime_session,
    prefill_feeds,
)
from edgequant.llm.gptq import GptqLayer, GptqReport, GptqSettings, gptq, gptq_round
from edgequant.llm.loading import ModelLoadError, ModelNotFoundError, load_causal_lm
from edgequant.llm.quantize import (
    KvCacheQuantizers,
    MemorySettings,
    kv_cache_quantizers,
    linear_input_quantizers,
    prepare_causal_lm,
    quantize,
)
from edgequant.llm.recipes import RECIPES, Recipe
from edgequant.llm.rotation import RotationReport, RotationSettings, rotate_causal_lm
from edgequant.llm.sequential_mse import (
    SequentialMseLayer,
    SequentialMseReport,
    SequentialMseSettings,
    sequential_mse,
)
from edgequant.llm.smoothing import (
    AwqReport,
    AwqSettings,
    ScaledGroup,
    SmoothingReport,
    SmoothingSettings,
    awq_causal_lm,
    smooth_causal_lm,
)
from edgequant.llm.text_data import TextDataError, TextSplit, pydoc_topics_split, token_sequences

__all__ = [
    "ORT_SESSION_CONFIG",
    "RECIPES",
    "AwqReport",
    "AwqSettings",
    "BlockCalibrationReport",
    "BlockCalibrationSettings",
    "CausalLmExport",
    "GenerationMatch",
    "GptqLayer",
    "GptqReport",
    "GptqSettings",
    "KvCacheQuantizers",
    "MemorySettings",
    "ModelLoadError",
    "ModelNotFoundError",
    "Recipe",
    "RotationReport",
    "RotationSettings",
    "ScaledGroup",
    "SequentialMseLayer",
    "SequentialMseReport",
    "SequentialMseSettings",
    "SmoothingReport",
    "SmoothingSettings",
    "TextDataError",
    "TextSplit",
    "TokenAgreement",
    "awq_causal_lm",
    "cache_names",
    "calibrate_by_block",
    "causal_mask",
    "export_causal_lm",
    "generation_match",
    "gptq",
    "gptq_round",
    "greedy_generate",
    "kv_cache_quantizers",
    "linear_input_quantizers",
    "load_causal_lm",
    "load_causal_lm_encodings",
    "next_token_agreement",
    "onnxruntime_generate",
    "onnxruntime_session",
    "perplexity",
    "prefill_feeds",
    "prepare_causal_lm",
    "pydoc_topics_split",
    "quantize",
    "rotate_causal_lm",
    "sequential_mse",
    "smooth_causal_lm",
    "token_sequences",
]
