"""W4A8 (per-channel weights): nearest rounding vs AdaRound on the bundled digits models, with timings.

Prints accuracy, AdaRound wall time, seconds per layer per 1000 iterations and the share of time spent in
data collection vs the optimisation. Usage: python benchmarks/bench_adaround.py [iterations]
"""

from __future__ import annotations

import sys
import time

from edgequant import QuantSim
from edgequant.demo.digits import evaluate_accuracy, load_digits_tensors, load_pretrained
from edgequant.ptq.adaround import adaround
from edgequant.ptq.batch_norm_fold import fold_batch_norms


def main(iterations: int) -> None:
    train_images, _ = load_digits_tensors("train")
    test_images, test_labels = load_digits_tensors("test")
    batches = list(train_images.split(64))
    for name in ("digits_cnn", "digits_dwcnn"):
        model = load_pretrained(name)
        fold_batch_norms(model, train_images[:2])
        fp32 = evaluate_accuracy(model, test_images, test_labels)
        sim = QuantSim(model, train_images[:2], param_bw=4, output_bw=8, config="per_channel")
        sim.calibrate(batches, progress=False)
        nearest = evaluate_accuracy(sim.model, test_images, test_labels)
        started = time.perf_counter()
        result = adaround(sim, batches, num_iterations=iterations, progress=False)
        wall = time.perf_counter() - started
        sim.calibrate(batches, progress=False)
        rounded = evaluate_accuracy(sim.model, test_images, test_labels)
        per_layer_k = result.optimize_seconds / len(result.layers) / (iterations / 1000)
        share = result.optimize_seconds / (result.optimize_seconds + result.collect_seconds)
        print(f"{name}: FP32 {fp32:.4f}  W4A8 nearest {nearest:.4f}  AdaRound {rounded:.4f}  "
              f"({len(result.layers)} layers, {iterations} it, {len(train_images)} samples)")
        print(f"  wall {wall:.1f} s, {per_layer_k:.2f} s per layer per 1000 it, optimisation {share:.1%} of the time "
              f"(collection {result.collect_seconds:.2f} s)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
