#!/usr/bin/env bash
# The CUDA checks in one run on a GPU machine with PyTorch preinstalled (no install: PYTHONPATH=src):
# compiled-vs-eager bit identity and graph counts on CUDA (tests/sim/test_compile.py runs its CUDA cases
# wherever CUDA exists), frozen weights, the device-parametrized tests, then the sim-speed benchmark
# (eager and torch.compile, forward and QAT training step; CUDA graphs), calibration per batch on CUDA, then the
# CPU figures on its 16 cores and the whole suite, most important first. Logs go to $OUT.
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
out=${OUT:-/tmp}
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, torch.cuda.get_device_name(), 'triton', triton.__version__)"
python3 -m pytest -q -p no:cacheprovider tests/sim/test_compile.py tests/sim/test_weight_cache.py 2>&1 \
    | tee "$out/compile_tests.log" | tail -15
python3 -m pytest -q -p no:cacheprovider tests/sim/test_devices.py 2>&1 | tee "$out/devices.log" | tail -5
python3 -m benchmarks.bench_sim_speed --device cuda --batch-size 32 --repeats 20 2>&1 | tee "$out/speed_cuda.log"
python3 -m benchmarks.bench_sim_speed --device cuda --batch-size 32 --repeats 20 --compile compiled \
    --compile-mode reduce-overhead --parts forward 2>&1 | tee "$out/speed_cuda_graphs.log"
python3 -m benchmarks.bench_calibration --device cuda --batch-size 32 --batches 8 --part time 2>&1 \
    | tee "$out/calibration_cuda.log"
python3 -m benchmarks.bench_sim_speed --device cpu --threads 16 --batch-size 32 --repeats 3 --compile eager \
    2>&1 | tee "$out/speed_cpu16.log"
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")  # pytest-xdist where the machine has it
python3 -m pytest -q -p no:cacheprovider $workers tests 2>&1 | tee "$out/tests.log" | tail -25
