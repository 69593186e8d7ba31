#!/usr/bin/env bash
# The `seqnorm-jax plan` outputs in this folder (run in a venv with the [tpu] extra, from
# the repository root): three paper configs at full scale.
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=experiments/results/plan
seqnorm-jax plan 003_fluctuation_mlp4 --topology v5e:1x1 > $out/003_fluctuation_mlp4.v5e-1x1.txt
seqnorm-jax plan 004_output_noise_vgg11 --run 0 --topology v5e:2x4 \
  > $out/004_output_noise_vgg11.run0.v5e-2x4.txt
seqnorm-jax plan 000_table2_imagenet_resnet18 --run "SeqNorm G_C=4 G_M=4" --topology v5e:4x4 \
  > $out/000_table2_imagenet_resnet18.seqnorm.v5e-4x4.txt
#
# The same on the paper's own hardware, 8 GPUs (in a venv with the [cuda] extra)
if [ "${WITH_GPU:-0}" = 1 ]; then
  seqnorm-jax plan 000_table2_imagenet_resnet18 --run 0 --topology h100:8 \
    > $out/000_table2_imagenet_resnet18.run0.h100-8.txt
fi
