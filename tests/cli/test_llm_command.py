"""``edgequant llm`` on a tiny random Llama saved as a transformers folder: what it prints and writes is what the
Python API computes for the same recipe and data, its sim state loads back, and bad input is one line naming the
option."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from pydoc_data.topics import topics

import pytest
from click.testing import CliRunner, Result

pytest.importorskip("transformers")

from tiny_llm import tiny_llama, tiny_tokenizer  # noqa: E402
from transformers.utils.logging import is_progress_bar_enabled  # noqa: E402

from edgequant.cli import main  # noqa: E402
from edgequant.llm import (  # noqa: E402
    RECIPES,
    generation_match,
    greedy_generate,
    load_causal_lm,
    next_token_agreement,
    perplexity,
    pydoc_topics_split,
    quantize,
    token_sequences,
)

SMALL = ["--seq-len", "24", "--num-calibration", "2", "--num-evaluation", "3", "--new-tokens", "6", "--quiet"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = tiny_tokenizer()
    tiny_llama(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A calibration file, a folder of evaluation files and a file too short for one sequence."""
    folder = tmp_path_factory.mktemp("texts")
    calibration = folder / "calibration.txt"
    calibration.write_text("\n\n".join(topics[name] for name in ("assert", "if", "while")), encoding="utf-8")
    evaluation = folder / "evaluation"
    evaluation.mkdir()
    for name in ("for", "try"):
        (evaluation / f"{name}.txt").write_text(topics[name], encoding="utf-8")
    short = folder / "short.txt"
    short.write_text("too short", encoding="utf-8")
    return {"calibration": calibration, "evaluation": evaluation, "short": short}


def _run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, ["llm", *map(str, args)])


def _printed(pattern: str, output: str) -> tuple[str, ...]:
    match = re.search(pattern, output)
    assert match, output
    return match.groups()


@pytest.fixture(scope="module")
def own_text_run(model_folder: Path, texts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
                 ) -> tuple[Result, Path]:
    out = tmp_path_factory.mktemp("out")
    result = _run(model_folder, "--calibration", texts["calibration"], "--evaluation", texts["evaluation"],
                  "--recipe", "w4a16-block", "--block-size", "32", "--kv-cache-bits", "8", "--lm-head-bits", "8",
                  "--prompt", "The if", "--output", out, *SMALL)
    assert result.exit_code == 0, result.output
    return result, out


def test_figures_are_the_python_api_ones_on_the_same_text(own_text_run, model_folder, texts):
    result, out = own_text_run
    summary = json.loads((out / "summary.json").read_text())
    model, tokenizer = load_causal_lm(model_folder)
    calibration = token_sequences(tokenizer, texts["calibration"], 24, 2)
    evaluation = token_sequences(tokenizer, texts["evaluation"], 24, 3)
    sim = quantize(model, calibration, recipe="w4a16-block", block_size=32, kv_cache_bw=8, lm_head_bw=8,
                   progress=False)
    float_perplexity = perplexity(model, evaluation, progress=False)
    quantized_perplexity = perplexity(sim, evaluation, progress=False)
    agreement = next_token_agreement(model, sim, evaluation, progress=False)
    prompt = tokenizer("The if", return_tensors="pt").input_ids
    match = generation_match(model, sim, [prompt], max_new_tokens=6, progress=False)

    assert summary["perplexity"]["float"] == pytest.approx(float_perplexity, rel=1e-9)
    assert summary["perplexity"]["quantized"] == pytest.approx(quantized_perplexity, rel=1e-9)
    assert quantized_perplexity != pytest.approx(float_perplexity, rel=1e-6)  # the comparison above can fail
    assert summary["perplexity"]["relative_change"] == pytest.approx(quantized_perplexity / float_perplexity - 1)
    assert summary["next_token_agreement"] == {"share": agreement.share, "agreeing": agreement.agreeing,
                                               "positions": agreement.positions}
    assert summary["generation"]["float_ids"] == greedy_generate(model, prompt, 6)[0].tolist()
    assert summary["generation"]["quantized_ids"] == greedy_generate(sim, prompt, 6)[0].tolist()
    assert summary["generation"]["float"] == tokenizer.decode(summary["generation"]["float_ids"],
                                                              skip_special_tokens=True)
    assert (summary["generation"]["identical"], summary["generation"]["matching_prefix"]) == (
        match.identical[0], match.matching_prefix[0])
    keys = ("model", "recipe", "block_size", "kv_cache_bits", "lm_head_bits", "seq_len")
    assert {key: summary[key] for key in keys} == {"model": str(model_folder), "recipe": "w4a16-block",
                                                   "block_size": 32, "kv_cache_bits": 8, "lm_head_bits": 8,
                                                   "seq_len": 24}
    assert summary["calibration"] == {"source": str(texts["calibration"]), "sequences": 2}
    assert summary["evaluation"] == {"source": str(texts["evaluation"]), "sequences": 3}
    assert set(summary["timings"]) == {"load_s", "calibrate_s", "evaluate_s", "generate_s"}

    printed_float, printed_quantized, printed_change = _printed(
        r"perplexity: float (\S+), quantized (\S+) \((\S+)%\)", result.output)
    assert float(printed_float) == pytest.approx(float_perplexity, abs=1e-4)
    assert float(printed_quantized) == pytest.approx(quantized_perplexity, abs=1e-4)
    assert float(printed_change) == pytest.approx(100 * (quantized_perplexity / float_perplexity - 1), abs=0.01)
    share, positions = _printed(r"next-token agreement: (\S+)% of (\d+) positions", result.output)
    assert (float(share), int(positions)) == (pytest.approx(100 * agreement.share, abs=0.01), 3 * 24)
    identical, prefix = _printed(r"\((\d+) of 6 tokens identical, the first (\d+) in a row", result.output)
    assert (int(identical), int(prefix)) == (match.identical[0], match.matching_prefix[0])
    float_text, quantized_text = _printed(r"float: +(.*)\n +quantized: +(.*)\n", result.output)
    assert (float_text, quantized_text) == (repr(summary["generation"]["float"]),
                                            repr(summary["generation"]["quantized"]))
    assert "calibrated on 2 sequences of 24 tokens from" in result.output
    assert "evaluated on 3 sequences of 24 tokens from" in result.output


def test_sim_state_loads_back_into_a_sim_calibrated_otherwise(own_text_run, model_folder, texts):
    _, out = own_text_run
    summary = json.loads((out / "summary.json").read_text())
    model, tokenizer = load_causal_lm(model_folder)
    other = pydoc_topics_split(tokenizer, seq_len=24, num_calibration=2, num_evaluation=0).calibration
    evaluation = token_sequences(tokenizer, texts["evaluation"], 24, 3)
    sim = quantize(model, other, recipe="w4a16-block", block_size=32, kv_cache_bw=8, progress=False)
    assert perplexity(sim, evaluation, progress=False) != pytest.approx(summary["perplexity"]["quantized"], rel=1e-9)
    sim.load(out / "sim.pt")
    assert perplexity(sim, evaluation, progress=False) == pytest.approx(summary["perplexity"]["quantized"], rel=1e-9)


def test_default_text_is_the_pydoc_split_and_default_recipe_is_the_library_one(model_folder, tmp_path):
    result = _run(model_folder, "--output", tmp_path, *SMALL)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    model, tokenizer = load_causal_lm(model_folder)
    split = pydoc_topics_split(tokenizer, seq_len=24, num_calibration=2, num_evaluation=3)
    sim = quantize(model, split.calibration, progress=False)
    assert summary["recipe"] in RECIPES and summary["kv_cache_bits"] == RECIPES[summary["recipe"]].activation_bw
    assert summary["perplexity"]["float"] == pytest.approx(perplexity(model, split.evaluation, progress=False),
                                                           rel=1e-9)
    assert summary["perplexity"]["quantized"] == pytest.approx(perplexity(sim, split.evaluation, progress=False),
                                                               rel=1e-9)
    assert summary["calibration"]["source"].startswith("pydoc calibration topics")
    assert summary["evaluation"]["source"].startswith("pydoc evaluation topics")
    assert (tmp_path / "sim.pt").is_file()


def test_same_calibration_and_evaluation_text_is_pointed_out(model_folder, texts, tmp_path):
    result = _run(model_folder, "--calibration", texts["evaluation"], "--evaluation", texts["evaluation"],
                  "--output", tmp_path, *SMALL)
    assert result.exit_code == 0, result.output
    assert "note: --calibration and --evaluation are the same text" in result.output
    assert "note:" not in _run(model_folder, "--evaluation", texts["evaluation"], "--output", tmp_path,
                               *SMALL).output


def test_progress_bars_unless_quiet(model_folder, tmp_path):
    bars = ("Loading weights", "calibrating", "perplexity:", "next-token agreement:")
    loud = _run(model_folder, "--output", tmp_path, *SMALL[:-1])
    assert loud.exit_code == 0, loud.output
    assert all(bar in loud.stderr for bar in bars), loud.stderr
    quiet = _run(model_folder, "--output", tmp_path, *SMALL)
    assert quiet.exit_code == 0, quiet.output
    assert not any(bar in quiet.stderr for bar in bars), quiet.stderr
    assert is_progress_bar_enabled()  # transformers' setting is as it was before --quiet


BAD_INPUT = {
    "unknown recipe": (["{model}", "--recipe", "w3a3"], "'--recipe': 'w3a3' is not one of " +
                       ", ".join(f"'{name}'" for name in RECIPES)),
    "missing model": (["{missing}"], r"MODEL: \S*no_model_here: no such file or folder"),
    "folder that is no model": (["{evaluation}"], r"MODEL: \S*evaluation: neither a transformers model folder"),
    "calibration too short": (["{model}", "--calibration", "{short}"],
                              r"--calibration: \S*short\.txt: \d+ tokens, only 0 sequences of 24 tokens"),
    "evaluation missing": (["{model}", "--evaluation", "{missing}"], r"--evaluation: \S*no_model_here: no such"),
    "pydoc split too short": (["{model}", "--num-evaluation", "100000"],
                              r"--num-evaluation 100000 with --seq-len 24: pydoc evaluation topics: \d+ tokens, "
                              r"only \d+ sequences of the 100000 asked for"),
    "kv bits": (["{model}", "--kv-cache-bits", "4"], r"'--kv-cache-bits': '4' is not one of '8', '16'"),
    "block size": (["{model}", "--block-size", "48"],
                   r"--block-size 48 does not divide the input features of every Linear layer \(64, 128\): use a "
                   r"divisor of 64"),
    "sequence of one token": (["{model}", "--seq-len", "1"], r"'--seq-len': 1 is not in the range x>=2"),
    "empty prompt": (["{model}", "--prompt", ""], r"--prompt: '' gives no tokens"),
    "output is a file": (["{model}", "--output", "{short}"], r"'--output'.*short\.txt' is a file"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_naming_the_option(case, model_folder, texts, tmp_path):
    args, expected = BAD_INPUT[case]
    paths = {"model": model_folder, "missing": tmp_path / "no_model_here", **texts}
    defaults = ["--seq-len", "24", "--num-calibration", "2", "--num-evaluation", "3", "--output", str(tmp_path)]
    result = _run(*defaults, *(arg.format(**paths) for arg in args), "--quiet")
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, result.output
    assert re.search(expected, errors[0]), errors[0]
    assert not (tmp_path / "summary.json").exists()


def test_recipe_choices_and_their_summaries_come_from_the_library():
    result = CliRunner().invoke(main, ["llm", "--help"])
    assert result.exit_code == 0
    help_text = "".join(result.output.split())  # click wraps lines, hyphenated words included
    for name, recipe in RECIPES.items():
        assert "".join(f"{name}: {recipe.summary}".split()) in help_text



def test_a_recipe_with_techniques_resumes_from_its_progress_folder(model_folder, tmp_path, monkeypatch):
    interrupted = tmp_path / "interrupted"
    gptq_module = importlib.import_module("edgequant.llm.gptq")
    original, rounded = gptq_module._round_layer, []

    def round_four(*args, **kwargs):
        if len(rounded) == 4:
            raise KeyboardInterrupt
        rounded.append(1)
        return original(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(gptq_module, "_round_layer", round_four)
        first = _run(model_folder, "--recipe", "w4a16-lpbq-gptq", "--block-size", "32", "--output", interrupted,
                     *SMALL)
    assert first.exit_code == 1  # the interruption, as Ctrl-C ends a command
    assert "run the same command again" in first.output
    assert len(list((interrupted / "progress" / "gptq").glob("layer_*.pt"))) == 4

    resumed = _run(model_folder, "--recipe", "w4a16-lpbq-gptq", "--block-size", "32", "--output", interrupted,
                   *SMALL)
    assert resumed.exit_code == 0, resumed.output
    assert not (interrupted / "progress").exists()  # sim.pt holds the result
    whole = _run(model_folder, "--recipe", "w4a16-lpbq-gptq", "--block-size", "32", "--output", tmp_path / "whole",
                 *SMALL)
    assert whole.exit_code == 0, whole.output
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in (interrupted, tmp_path / "whole")]
    assert summaries[0]["perplexity"] == summaries[1]["perplexity"]
