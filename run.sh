#!/usr/bin/env bash
# The paper's experiments, one run after the other, each with the released hyperparameters (the
# presets in l2w.py) and both training methods: baseline (every sample weighs 1 at every exit)
# and L2W-DEN. Each run writes runs/<name>/{checkpoint.pt,results.json}.
# Safe to re-run after a crash or preemption: a finished run (results.json) is skipped, an
# interrupted one (checkpoint.pt) continues from its checkpoint, the others start.
# Extra flags are passed to every run, e.g.  bash run.sh --data-dir /datasets --device cuda:1
# DRY_RUN=1 bash run.sh prints what it would run, and runs nothing.
#
# bash run.sh miniature [FLAGS]: the miniature study instead, on a CPU in about 6 minutes: baseline
# and L2W-DEN on the demo's synthetic data (the synthetic preset, 3 exits) for seeds 0-4, then
# their comparison (l2w.py --summary) in runs/miniature/summary.json.
#
# ImageNet runs only when IMAGENET=/path/to/imagenet is set (DIR/train, DIR/val in class folders),
# on GPUS GPUs of this machine (default 8) with torchrun.
set -euo pipefail
cd "$(dirname "$0")"

# execute COMMAND...: run it, or with DRY_RUN print it
execute() {
  if [ -n "${DRY_RUN:-}" ]; then echo "  $*"; else "$@"; fi
}

# run OUT LAUNCHER... -- ARGS...: skip, continue or start the run that writes into OUT
run() {
  local out=$1; shift
  local launcher=()
  while [ "$1" != "--" ]; do launcher+=("$1"); shift; done
  shift
  if [ -f "$out/results.json" ]; then
    echo "== $out: finished, skipped"
  elif [ -f "$out/checkpoint.pt" ]; then
    echo "== $out: continuing"
    execute "${launcher[@]}" l2w.py --resume "$out/checkpoint.pt" "${extra[@]}"
  else
    echo "== $out"
    execute "${launcher[@]}" l2w.py "$@" --out "$out" "${extra[@]}"
  fi
}
entry=paper
if [ "${1:-}" = miniature ]; then entry=miniature; shift; fi
extra=("$@")

if [ "$entry" = miniature ]; then
  runs=()
  for seed in 0 1 2 3 4; do
    for method in baseline l2w; do
      run "runs/miniature/${method}_seed$seed" python -- --dataset synthetic --exits 3 --method "$method" --seed "$seed"
      runs+=("runs/miniature/${method}_seed$seed")
    done
  done
  execute python l2w.py --summary "${runs[@]}" --out runs/miniature/summary.json
  exit 0
fi

# CIFAR-10 and CIFAR-100: MSDNet with 5 and 7 exits, RANet Model-C-1 (6 exits) and Model-C-2
# (8 exits); 300 epochs, batch 1024 in halves of 512
for dataset in cifar10 cifar100; do
  for model in msdnet:5 msdnet:7 ranet:6 ranet:8; do
    for method in baseline l2w; do
      run "runs/${dataset}_${model/:/}_${method}" python -- \
        --dataset "$dataset" --arch "${model%:*}" --exits "${model#*:}" --method "$method"
    done
  done
done

# Long-tailed CIFAR (imbalance 100: 12,406 / 10,847 training images), MSDNet with 5 exits
for dataset in cifar10-lt cifar100-lt; do
  for method in baseline l2w; do
    run "runs/${dataset}100_msdnet5_${method}" python -- \
      --dataset "$dataset" --imbalance 100 --arch msdnet --exits 5 --method "$method"
  done
done

# q tuned on the hold-out (supplementary Sec. 1.3), CIFAR-100 MSDNet with 5 exits: L2W-DEN at
# q = 0.25, 0.5, 0.75 (the preset, the run above) and 1.0, compared on their hold-out curves
for q in 0.25 0.5 1.0; do
  run "runs/cifar100_msdnet5_l2w_q$q" python -- --dataset cifar100 --arch msdnet --exits 5 --q "$q"
done
execute python l2w.py --select-q runs/cifar100_msdnet5_l2w_q0.25 runs/cifar100_msdnet5_l2w_q0.5 \
  runs/cifar100_msdnet5_l2w runs/cifar100_msdnet5_l2w_q1.0 --out runs/cifar100_msdnet5_select_q.json

# Table 4 of the supplementary: the WPN's size, d hidden layers of width w, CIFAR-100 MSDNet with
# 5 exits. Its baseline and d = 1, w = 500 (the preset) are the runs above.
for size in 1:10 1:100 1:1000 2:500 4:500; do
  run "runs/cifar100_msdnet5_l2w_d${size%:*}_w${size#*:}" python -- \
    --dataset cifar100 --arch msdnet --exits 5 --wpn-depth "${size%:*}" --wpn-width "${size#*:}"
done

# IMTA compatibility (supplementary Sec. 1.4): phase 1 with gradient equilibrium, then phase 2 (ISC
# heads with one-for-all distillation on the frozen phase-1 network), the meta-learning of the
# method in both phases. CIFAR-100, MSDNet with 5 exits (IMTA's T = 3, gamma = 0.9).
for method in baseline l2w; do
  run "runs/cifar100_msdnet5_${method}_imta1" python -- \
    --dataset cifar100 --arch msdnet --exits 5 --method "$method" --imta pretrain
  run "runs/cifar100_msdnet5_${method}_imta2" python -- \
    --imta finetune --pretrained "runs/cifar100_msdnet5_${method}_imta1/checkpoint.pt" --method "$method"
done

# ImageNet, MSDNet with step s = 4, 6, 7 (100 epochs, global batch 4096 in halves of 2048), and
# IMTA's two phases for s = 4 (T = 1, gamma = 0.1)
if [ -n "${IMAGENET:-}" ]; then
  for step in 4 6 7; do
    for method in baseline l2w; do
      run "runs/imagenet_msdnet5_s${step}_${method}" torchrun --standalone --nproc_per_node "${GPUS:-8}" -- \
        --dataset imagenet --data-dir "$IMAGENET" --arch msdnet --exits 5 --step "$step" --method "$method"
    done
  done
  for method in baseline l2w; do
    run "runs/imagenet_msdnet5_s4_${method}_imta1" torchrun --standalone --nproc_per_node "${GPUS:-8}" -- \
      --dataset imagenet --data-dir "$IMAGENET" --arch msdnet --exits 5 --step 4 --method "$method" --imta pretrain
    run "runs/imagenet_msdnet5_s4_${method}_imta2" torchrun --standalone --nproc_per_node "${GPUS:-8}" -- \
      --imta finetune --data-dir "$IMAGENET" --method "$method" \
      --pretrained "runs/imagenet_msdnet5_s4_${method}_imta1/checkpoint.pt"
  done
fi
