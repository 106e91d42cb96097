#!/usr/bin/env bash
# Every GPU check in one go, for a machine with a CUDA device: the card, the correctness tests
# (pytest -m gpu: GPU vs CPU, compiled vs eager, vectorized vs alone), then the GPU sections of
# the benchmark. Logs and bench.json go to $OUT (default ./gpu-results). Each stage has its own
# time limit, so that a slow stage still leaves the others' results.
#
#   bash scripts/gpu_check.sh            # in a checkout with bnexp installed (pip install -e .)
set -u
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
  --format=csv 2>&1 | tee "$out/card.txt"
$python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name())" 2>&1 | tee -a "$out/card.txt"
timeout "${TEST_TIMEOUT:-220}" $python -m pytest -m gpu -s -q -p no:cacheprovider \
  tests/test_cuda.py 2>&1 | tee "$out/tests.txt"
timeout "${BENCH_TIMEOUT:-330}" $python scripts/bench.py --only ${SECTIONS:-gpu vectorized} \
  --repeats "${REPEATS:-2}" --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
