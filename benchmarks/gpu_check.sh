#!/usr/bin/env bash
# The CUDA checks and measurements no CPU test can reach, on one GPU, in under 8 minutes:
# bf16/fp32 training throughput of every backbone at paper size, a 4-trial search sharing the
# GPU (0.25 each), 2-worker DDP with NCCL on the one GPU, the parallel Mamba scan on CUDA.
#
#     bash benchmarks/gpu_check.sh OUT      # writes OUT/gpu_check.{json,md} and OUT/nvidia-smi.txt
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash benchmarks/gpu_check.sh OUT}"
mkdir -p "$out"
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not found" >"$out/nvidia-smi.txt"
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())" >"$out/torch.txt" 2>&1
timeout 470 python benchmarks/gpu_check.py --out "$out" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
