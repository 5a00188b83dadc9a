"""AutoQuant end to end on the bundled digits CNN (allowed drop 1%): steps taken, final metric, time.

Usage: python benchmarks/bench_autoquant.py [param_bw] [adaround_iterations]
"""

from __future__ import annotations

import sys
import tempfile
import time

from edgequant.demo.digits import evaluate_accuracy, load_digits_tensors, load_pretrained
from edgequant.workflows import autoquant


def main(param_bw: int, iterations: int) -> None:
    train_images, _ = load_digits_tensors("train")
    test_images, test_labels = load_digits_tensors("test")
    model = load_pretrained("digits_cnn")
    with tempfile.TemporaryDirectory() as results_dir:
        for run in ("first run", "rerun (cache)"):
            started = time.perf_counter()
            result = autoquant(model, train_images[:2], list(train_images.split(64)),
                               lambda m: evaluate_accuracy(m, test_images, test_labels), allowed_accuracy_drop=0.01,
                               param_bw=param_bw, results_dir=results_dir, adaround_iterations=iterations,
                               progress=False)
            seconds = time.perf_counter() - started
            steps = ", ".join(f"{s.name}={s.metric:.4f}" for s in result.steps if s.metric is not None)
            print(f"W{param_bw}A8 {run}: {seconds:.1f} s; target {result.target_metric:.4f} "
                  f"{'met' if result.target_met else 'NOT met'} by {result.best_step} ({result.best_metric:.4f})")
            print(f"  steps: {steps}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 8, int(sys.argv[2]) if len(sys.argv) > 2 else 2000)
