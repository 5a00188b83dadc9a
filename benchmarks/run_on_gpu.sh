#!/usr/bin/env bash
# The CUDA checks in one run on a GPU machine with PyTorch preinstalled (no install: PYTHONPATH=src):
# the device-parametrized tests, the whole suite, and the sim-speed benchmark on the GPU and on its CPUs.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
nvidia-smi -L
python3 -c "import torch, onnxruntime, transformers; print(torch.__version__, torch.cuda.get_device_name(),
onnxruntime.__version__, transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/test_devices.py 2>&1 | tee "$out/devices.log" | tail -15
python3 -m pytest -q -p no:cacheprovider -n 8 tests 2>&1 | tee "$out/tests.log" | tail -25
python3 -m benchmarks.bench_sim_speed --device cuda --repeats 10 2>&1 | tee "$out/speed_cuda.log"
python3 -m benchmarks.bench_sim_speed --device cpu --threads 16 --repeats 3 2>&1 | tee "$out/speed_cpu16.log"
