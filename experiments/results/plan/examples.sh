#!/usr/bin/env bash
# The `seqnorm-jax plan` outputs in this folder, from the repository root:
#   experiments/results/plan/examples.sh tpu   (in a venv with the [tpu] extra)
#   experiments/results/plan/examples.sh gpu   (in a venv with the [cuda] extra)
# Paper configs at full scale. The step figures are the compilers' (per device); "compiled
# in" is the time on the machine that wrote them: a 2-core x86_64 VM shared with other
# jobs (load 3-5: two other compiles), jax 0.10.2, libtpu 0.0.42.1, jax-cuda12-plugin
# 0.10.2; regenerated 2026-12-07 on the current code (step figures unchanged).
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=experiments/results/plan
case "${1:-tpu}" in
  tpu)
    seqnorm-jax plan 003_fluctuation_mlp4 --topology v5e:1x1 \
      > $out/003_fluctuation_mlp4.v5e-1x1.txt
    seqnorm-jax plan 004_output_noise_vgg11 --run 0 --topology v5e:2x4 \
      > $out/004_output_noise_vgg11.run0.v5e-2x4.txt
    seqnorm-jax plan 000_table2_imagenet_resnet18 --run "SeqNorm G_C=4 G_M=4" \
      --topology v5e:4x4 > $out/000_table2_imagenet_resnet18.seqnorm.v5e-4x4.txt ;;
  gpu)  # the paper's own hardware: 8 GPUs, batch 512
    seqnorm-jax plan 000_table2_imagenet_resnet18 --run 0 --topology h100:8 \
      > $out/000_table2_imagenet_resnet18.run0.h100-8.txt ;;
  *) echo "usage: $0 tpu|gpu" >&2; exit 2 ;;
esac
