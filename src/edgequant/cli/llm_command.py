"""``edgequant llm``: quantize a causal language model for a recipe and compare it with its float original
(registered by `edgequant.cli`).

One command answers "what does this recipe cost on my model": perplexity before and after, how often both models
pick the same next token, and a greedy continuation side by side, on text that needs no download by default (the
standard library's pydoc topics).
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from edgequant import __version__
from edgequant.cli.data import quiet_option
from edgequant.cli.errors import debug_option, one_line
from edgequant.llm import (
    RECIPES,
    greedy_generate,
    load_causal_lm,
    next_token_agreement,
    perplexity,
    pydoc_topics_split,
    quantize,
    token_sequences,
)

DEFAULT_RECIPE = inspect.signature(quantize).parameters["recipe"].default
DEFAULT_PROMPT = "The for statement is used to iterate over the elements of a sequence"
PROGRESS_FOLDER = "progress"  # in --output: the finished layers of a recipe's techniques, until sim.pt is written
PYDOC_SOURCE = "pydoc {side} topics (Python's own help text)"


@click.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--calibration", type=click.Path(path_type=Path), metavar="PATH",
              help="Calibration text: a UTF-8 .txt file or a folder of them. Default: the pydoc topics.")
@click.option("--evaluation", type=click.Path(path_type=Path), metavar="PATH",
              help="Evaluation text, as --calibration. Default: the pydoc topics not used for calibration.")
@click.option("--recipe", type=click.Choice(list(RECIPES)), metavar="NAME", default=DEFAULT_RECIPE, show_default=True,
              help="What gets which bits: " + "; ".join(f"{name}: {recipe.summary}" for name, recipe in
                                                        RECIPES.items()) + ".")
@click.option("--block-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Input features per weight block, for the recipes with blocks.")
@click.option("--kv-cache-bits", type=click.Choice([8, 16]),
              help="Bits of the keys and values the KV cache stores [default: the recipe's activation bits].")
@click.option("--lm-head-bits", type=click.IntRange(min=2, max=16),
              help="Bits of lm_head's weight, per channel, instead of the recipe's (many targets keep it at 8).")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True,
              help="Tokens per sequence.")
@click.option("--num-calibration", type=click.IntRange(min=1), default=16, show_default=True,
              help="Calibration sequences (fewer if the text is shorter).")
@click.option("--num-evaluation", type=click.IntRange(min=1), default=32, show_default=True,
              help="Evaluation sequences (fewer if the text is shorter).")
@click.option("--prompt", default=DEFAULT_PROMPT, show_default=True, help="Prompt of the generation sample.")
@click.option("--new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Tokens each model generates after --prompt.")
@click.option("--output", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("edgequant_llm"), show_default=True, help="Output folder (summary.json, sim.pt).")
@quiet_option
@debug_option
def llm(model_path: Path, calibration: Path | None, evaluation: Path | None, recipe: str, block_size: int,
        kv_cache_bits: int | None, lm_head_bits: int | None, seq_len: int, num_calibration: int,
        num_evaluation: int, prompt: str, new_tokens: int, out_dir: Path, quiet: bool) -> None:
    """Quantize a causal LM (a transformers folder or a .gguf file) and compare it with the float model.

    Prints float and quantized perplexity, next-token agreement and a greedy continuation of --prompt by both
    models; writes summary.json and the sim state (sim.pt, for QuantSim.load) to --output.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with _naming("MODEL"), _transformers_progress(not quiet):
        model, tokenizer = load_causal_lm(model_path)
    timings["load_s"] = time.perf_counter() - started
    chosen = RECIPES[recipe]
    kv_bits = kv_cache_bits or chosen.activation_bw
    blocks = chosen.linear_grid != "per_channel"
    if blocks:
        _check_block_size(model, block_size)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    click.echo(f"model: {model_path} ({type(model).__name__}, {parameters / 1e6:.1f} M parameters)  |  "
               f"recipe {recipe}{f', block size {block_size}' if blocks else ''}, KV cache {kv_bits}-bit"
               f"{f', lm_head {lm_head_bits}-bit' if lm_head_bits else ''}")

    calibration_ids, calibration_source = _sequences(tokenizer, calibration, "calibration", seq_len, num_calibration)
    evaluation_ids, evaluation_source = _sequences(tokenizer, evaluation, "evaluation", seq_len, num_evaluation)
    if calibration is not None and evaluation is not None and calibration.resolve() == evaluation.resolve():
        click.echo("note: --calibration and --evaluation are the same text: the perplexities are not on held-out "
                   "text")
    with _naming("--prompt"):
        prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
        if prompt_ids.shape[1] == 0:
            raise ValueError(f"{prompt!r} gives no tokens: give some text")

    with _naming("--output"):  # before the long part, which a folder that cannot be written would waste
        out_dir.mkdir(parents=True, exist_ok=True)

    resume_dir = out_dir / PROGRESS_FOLDER if chosen.techniques else None
    if resume_dir is not None:
        click.echo(f"{' and '.join(chosen.techniques)} keep their finished layers in {resume_dir}: after an "
                   f"interruption, run the same command again to go on from there")
    started = time.perf_counter()
    sim = quantize(model, calibration_ids, recipe=recipe, block_size=block_size, kv_cache_bw=kv_cache_bits,
                   lm_head_bw=lm_head_bits, progress=not quiet, resume_dir=resume_dir)
    timings["calibrate_s"] = time.perf_counter() - started
    click.echo(f"calibrated on {_described(calibration_ids, calibration_source)} in {timings['calibrate_s']:.2f} s")

    started = time.perf_counter()
    float_perplexity = perplexity(model, evaluation_ids, progress=not quiet)
    quantized_perplexity = perplexity(sim, evaluation_ids, progress=not quiet)
    agreement = next_token_agreement(model, sim, evaluation_ids, progress=not quiet)
    timings["evaluate_s"] = time.perf_counter() - started
    relative_change = quantized_perplexity / float_perplexity - 1
    click.echo(f"evaluated on {_described(evaluation_ids, evaluation_source)} in {timings['evaluate_s']:.2f} s")
    click.echo(f"perplexity: float {float_perplexity:.4f}, quantized {quantized_perplexity:.4f} "
               f"({100 * relative_change:+.2f}%)")
    click.echo(f"next-token agreement: {100 * agreement.share:.2f}% of {agreement.positions} positions")

    started = time.perf_counter()
    float_ids = greedy_generate(model, prompt_ids, new_tokens)[0]
    quantized_ids = greedy_generate(sim, prompt_ids, new_tokens)[0]
    timings["generate_s"] = time.perf_counter() - started
    same = float_ids == quantized_ids
    generation = {
        "prompt": prompt, "new_tokens": new_tokens,
        "float": tokenizer.decode(float_ids, skip_special_tokens=True),
        "quantized": tokenizer.decode(quantized_ids, skip_special_tokens=True),
        "float_ids": float_ids.tolist(), "quantized_ids": quantized_ids.tolist(),
        "identical": int(same.sum()), "matching_prefix": int(same.cumprod(0).sum()),
    }
    click.echo(f"greedy continuation of {prompt!r} ({generation['identical']} of {new_tokens} tokens identical, "
               f"the first {generation['matching_prefix']} in a row; {timings['generate_s']:.2f} s):")
    click.echo(f"  float:     {generation['float']!r}")
    click.echo(f"  quantized: {generation['quantized']!r}")

    summary = {
        "edgequant_version": __version__,
        "model": str(model_path),
        "model_class": type(model).__name__,
        "parameters": parameters,
        "recipe": recipe,
        "recipe_summary": chosen.summary,
        "block_size": block_size,
        "kv_cache_bits": kv_bits,
        "lm_head_bits": lm_head_bits or chosen.linear_bw,
        "seq_len": seq_len,
        "calibration": {"source": calibration_source, "sequences": len(calibration_ids)},
        "evaluation": {"source": evaluation_source, "sequences": len(evaluation_ids)},
        "perplexity": {"float": float_perplexity, "quantized": quantized_perplexity,
                       "relative_change": relative_change},
        "next_token_agreement": {"share": agreement.share, "agreeing": agreement.agreeing,
                                 "positions": agreement.positions},
        "generation": generation,
        "timings": timings,
    }
    files = [out_dir / "summary.json", out_dir / "sim.pt"]
    files[0].write_text(json.dumps(summary, indent=1))
    sim.save(files[1])
    if resume_dir is not None:
        shutil.rmtree(resume_dir)  # the sim state holds the result now
    click.echo(f"wrote {', '.join(str(file) for file in files)}")


def _sequences(tokenizer: Any, path: Path | None, side: str, seq_len: int, count: int) -> tuple[torch.Tensor, str]:
    """The token sequences of one side and where they come from: the user's text, else that side of the pydoc
    split (each side is cut on its own, so that an error names the option to change)."""
    if path is not None:
        with _naming(f"--{side}"):
            return token_sequences(tokenizer, path, seq_len, count), str(path)
    counts = {"num_calibration": 0, "num_evaluation": 0, f"num_{side}": count}
    with _naming(f"--num-{side} {count} with --seq-len {seq_len}"):
        split = pydoc_topics_split(tokenizer, seq_len=seq_len, **counts)
    return getattr(split, side), PYDOC_SOURCE.format(side=side)


def _check_block_size(model: nn.Module, block_size: int) -> None:
    """Refuse a block size that does not divide every Linear layer's input features, naming the option (the sim
    would name the first layer's weight quantizer)."""
    widths = sorted({module.in_features for module in model.modules() if isinstance(module, nn.Linear)})
    if any(width % block_size for width in widths):
        raise ValueError(f"--block-size {block_size} does not divide the input features of every Linear layer "
                         f"({', '.join(map(str, widths))}): use a divisor of {math.gcd(*widths)}")


def _described(ids: torch.Tensor, source: str) -> str:
    return f"{ids.shape[0]} sequences of {ids.shape[1]} tokens from {source}"


@contextmanager
def _naming(option: str) -> Iterator[None]:
    """Errors about what the user gave, on one line that starts with the option that gave it."""
    try:
        yield
    except (ValueError, OSError) as error:
        raise ValueError(f"{option}: {one_line(error)}") from error


@contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Transformers' own progress bars (weight loading) follow --quiet, and are as before afterwards."""
    from transformers.utils import logging  # noqa: PLC0415 - loaded only with a language model

    was_enabled = logging.is_progress_bar_enabled()
    (logging.enable_progress_bar if enabled else logging.disable_progress_bar)()
    try:
        yield
    finally:
        (logging.enable_progress_bar if was_enabled else logging.disable_progress_bar)()
