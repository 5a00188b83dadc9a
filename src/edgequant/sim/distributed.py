"""Calibration across processes: every rank observes its shard, then all ranks merge all statistics.

Statistics are gathered once for all quantizers (one collective) and merged in rank order on every rank, so
every rank computes bit-identical encodings; for min-max they equal those of one process that saw all data.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from edgequant.quantization import EncodingAnalyzer, Quantizer


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _on_device(analyzer: EncodingAnalyzer, device: torch.device) -> EncodingAnalyzer:
    moved = copy.copy(analyzer)
    for key, value in vars(analyzer).items():
        if isinstance(value, torch.Tensor):
            setattr(moved, key, value.to(device))
    return moved


def synchronize_statistics(quantizers: list[Quantizer]) -> None:
    """Replace each quantizer's analyzer statistics by the merge of all ranks' (a no-op outside a group)."""
    if not is_distributed() or not quantizers:
        return
    cpu = torch.device("cpu")
    local = [_on_device(q.analyzer, cpu) for q in quantizers]
    gathered: list[list[EncodingAnalyzer] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    for index, quantizer in enumerate(quantizers):
        device = next((v.device for v in vars(quantizer.analyzer).values() if isinstance(v, torch.Tensor)),
                      quantizer.scale.device if quantizer.scale is not None else cpu)
        merged = copy.deepcopy(gathered[0][index])
        for rank_statistics in gathered[1:]:
            merged.merge(rank_statistics[index])
        quantizer.analyzer = _on_device(merged, device)
