#!/usr/bin/env bash
# The CUDA checks and measurements no CPU test can reach, on one GPU, in about 8 minutes:
# bf16/fp32 training throughput of every backbone at paper size (bf16 also channels-last and
# compiled), a 4-trial search sharing the GPU (0.25 each), 2-worker DDP on the one GPU, NCCL with
# two ranks on one GPU, the parallel Mamba scan on CUDA, the plan measured on the GPU, and a
# 5-minute default pipeline ending in a submission.
#
#     bash benchmarks/gpu_check.sh OUT      # writes OUT/gpu_check.{json,md,log}, nvidia-smi.txt, versions.txt
#     bash benchmarks/gpu_check.sh OUT --smoke-test   # the same, tiny, on a CPU
#
# Ray's checks run in their own process under their own limit, so that a Ray that hangs
# cannot take the throughput numbers with it; both merge into OUT/gpu_check.json.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash benchmarks/gpu_check.sh OUT}"
mkdir -p "$out"
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || echo "nvidia-smi not found" >"$out/nvidia-smi.txt"
python3 -c "import torch, ray; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), ray.__version__)" \
    >"$out/versions.txt" 2>&1
timeout 200 python3 benchmarks/gpu_check.py --out "$out" --parts mamba,nccl,throughput "${@:2}" 2>&1 | tee "$out/gpu_check.log"
first=${PIPESTATUS[0]}
timeout 200 python3 benchmarks/gpu_check.py --out "$out" --parts search,ddp,plan "${@:2}" 2>&1 | tee -a "$out/gpu_check.log"
second=${PIPESTATUS[0]}
timeout 420 python3 benchmarks/gpu_check.py --out "$out" --parts pipeline "${@:2}" 2>&1 | tee -a "$out/gpu_check.log"
third=${PIPESTATUS[0]}
[ "$first" = 0 ] && [ "$second" = 0 ] && [ "$third" = 0 ]
