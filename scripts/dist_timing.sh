#!/bin/bash
# Wall time of the block recipe (30 distillation steps, layers 10-19) with 1 process of 2 threads
# against 2 torchrun ranks of 1 thread each; logs and JSONs in runs/dist/. About 30 min on 2 cores.
# Measured (README "Data-parallel calibration"): 857 s in one process, 783 s on 2 ranks, same figures.
set -e
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
mkdir -p runs/dist
COMMON="--layers 10-19 --fit block --distill-steps 30 --max-new-tokens 0 --prompts src/bcllm/data/heldout_prompts.txt"
/usr/bin/time -v .venv/bin/python -m bcllm eval $COMMON --json runs/dist/rank1.json > runs/dist/rank1.log 2>&1
OMP_NUM_THREADS=1 /usr/bin/time -v .venv/bin/torchrun --nproc-per-node 2 -m bcllm eval $COMMON \
    --json runs/dist/rank2.json > runs/dist/rank2.log 2>&1
grep -h "^stage\|^time:" runs/dist/rank1.log runs/dist/rank2.log
