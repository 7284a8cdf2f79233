#!/usr/bin/env bash
# The paper's CIFAR experiments: MSDNet with 5 and 7 exits on CIFAR-10 and CIFAR-100, trained
# plainly (baseline: every sample weighs 1 at every exit) and with L2W-DEN, 300 epochs each with
# the released hyperparameters (the cifar presets in l2w.py). Each run writes
# runs/<dataset>_msdnet<exits>_<method>/{checkpoint.pt,results.json}; an interrupted run
# continues with `python l2w.py --resume runs/<...>/checkpoint.pt`.
# Extra flags are passed to every run, e.g.  bash run.sh --data-dir /datasets --device cuda:1
set -euo pipefail
cd "$(dirname "$0")"
for dataset in cifar10 cifar100; do
  for exits in 5 7; do
    for method in baseline l2w; do
      python l2w.py --dataset "$dataset" --arch msdnet --exits "$exits" --method "$method" "$@"
    done
  done
done
