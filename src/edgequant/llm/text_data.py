"""Token sequences for calibrating and evaluating a language model.

`pydoc_topics_split` gives a fixed benchmark split that needs no download: the help topics of Python's own
documentation (``pydoc_data.topics``, part of the standard library). `token_sequences` cuts the user's own text the
same way. Both tokenize without special tokens and cut the token stream into consecutive, non-overlapping
sequences, so that every token is seen once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EVALUATION_EVERY = 4
"""Of the pydoc topics sorted by name, those at an index divisible by this are held out for evaluation."""

TEXT_SEPARATOR = "\n\n"


class TextDataError(ValueError):
    """Text that cannot give the token sequences asked for; the message says how many it can give."""


@dataclass(frozen=True)
class TextSplit:
    """Token sequences from disjoint texts: ``calibration`` [N, seq_len] and ``evaluation`` [M, seq_len], int64."""

    calibration: torch.Tensor
    evaluation: torch.Tensor


def pydoc_topics_split(
    tokenizer: PreTrainedTokenizerBase, *, seq_len: int = 256, num_calibration: int = 16, num_evaluation: int = 32
) -> TextSplit:
    """Calibration and evaluation sequences from the standard library's pydoc topics, with no text in both.

    The topic names are sorted; the topics at sorted index 0, 4, 8, ... (``index % EVALUATION_EVERY == 0``) make
    the evaluation text, the others the calibration text, each side's texts joined with a blank line in name
    order. Each side gives its first ``num_*`` sequences of ``seq_len`` tokens. The topics are those of the running
    Python version, so results are comparable between runs on the same Python minor version.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    evaluation_texts = [topics[name] for index, name in enumerate(names) if index % EVALUATION_EVERY == 0]
    calibration_texts = [topics[name] for index, name in enumerate(names) if index % EVALUATION_EVERY != 0]
    return TextSplit(
        calibration=_sequences(tokenizer, calibration_texts, seq_len, num_calibration, "pydoc calibration topics"),
        evaluation=_sequences(tokenizer, evaluation_texts, seq_len, num_evaluation, "pydoc evaluation topics"),
    )


def token_sequences(
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str] | str | Path,
    seq_len: int = 256,
    max_sequences: int | None = None,
) -> torch.Tensor:
    """Up to ``max_sequences`` (all if None) sequences of ``seq_len`` tokens from the user's text, int64 [N, seq_len].

    ``texts`` is a path (str or Path) to a UTF-8 ``.txt`` file or to a folder whose ``*.txt`` files are read in
    name order (not recursing), or an iterable of texts. Texts are joined with a blank line; a tail shorter than
    ``seq_len`` is dropped.
    """
    if isinstance(texts, (str, Path)):
        source = str(texts)
        texts = _read_texts(Path(texts))
    else:
        texts = list(texts)
        source = f"the {len(texts)} texts given"
    return _sequences(tokenizer, texts, seq_len, max_sequences, source, at_most=True)


def _read_texts(path: Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such text file or folder")
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise TextDataError(f"{path}: the folder holds no .txt file")
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise TextDataError(f"{file}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    return texts


def _sequences(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    seq_len: int,
    count: int | None,
    source: str,
    *,
    at_most: bool = False,
) -> torch.Tensor:
    """The first ``count`` consecutive ``seq_len``-token sequences of the joined texts (fewer if ``at_most``)."""
    if seq_len < 1:
        raise TextDataError(f"seq_len must be at least 1, got {seq_len}")
    if count is not None and count < 0:
        raise TextDataError(f"the number of sequences must not be negative, got {count}")
    if count == 0:
        return torch.empty(0, seq_len, dtype=torch.long)
    # verbose=False: the whole text is longer than the model's context on purpose; it is cut below
    ids = tokenizer.encode(TEXT_SEPARATOR.join(texts), add_special_tokens=False, verbose=False)
    available = len(ids) // seq_len
    if available == 0 or (count is not None and not at_most and available < count):
        asked = "" if count is None or at_most else f" of the {count} asked for"
        raise TextDataError(
            f"{source}: {len(ids)} tokens, only {available} sequences{asked} of {seq_len} tokens; "
            "use a shorter seq_len, fewer sequences or more text"
        )
    taken = available if count is None else min(count, available)
    return torch.tensor(ids[: taken * seq_len], dtype=torch.long).reshape(taken, seq_len)
