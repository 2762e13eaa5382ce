#!/bin/bash
# The benchmark matrix behind the figures in the README and docs/speed.md (session 5: TAG=v11; v10 ran the same
# cells before this script existed, with one warm-up run instead of two at batch 16, whose second run page-faults).
#   tools/bench_matrix.sh TAG [bench.py options...]     e.g.  tools/bench_matrix.sh v11 --provider cuda
# Writes tools/bench_results/TAG-MODEL-bBATCH-RULE.json for each cell, then prints the summary table.
# About 20 minutes on the 2-core CPU machine of docs/speed.md (v11: 19 minutes; the torch child for `epsilon`
# and `rlrp`, added in session 6, adds a few minutes).
set -euo pipefail
tag=${1:?usage: tools/bench_matrix.sh TAG [bench.py options...]}
shift
cd "$(dirname "$0")/.."
out=tools/bench_results
run() { python tools/bench.py --threads "${THREADS:-2}" "$@"; }
for rule in epsilon rlrp epsilon-plus-flat epsilon-gamma-box epsilon-alpha2-beta1 cmp; do
  zennit=--no-zennit  # the torch child (plain gradient, Zennit where it has the rule) for three rules
  case $rule in epsilon | rlrp | epsilon-plus-flat) zennit= ;; esac
  run --model resnet50 --rule $rule --batch 1 --repeats 15 --warmup 2 --compile-repeats 3 $zennit "$@" \
      --json $out/$tag-resnet50-b1-$rule.json
  run --model vgg16 --rule $rule --batch 1 --repeats 9 --warmup 2 --compile-repeats 3 $zennit "$@" \
      --json $out/$tag-vgg16-b1-$rule.json
done
for rule in epsilon rlrp; do
  for model in resnet50 vgg16; do
    run --model $model --rule $rule --batch 16 --repeats 3 --warmup 2 --memory-runs 1 --no-zennit "$@" \
        --json $out/$tag-$model-b16-$rule.json
  done
done
for rule in epsilon epsilon-plus-flat; do
  zennit=--no-zennit; [ "$rule" = epsilon-plus-flat ] && zennit=
  run --model mobilenetv2 --rule $rule --batch 1 --repeats 15 --warmup 2 --compile-repeats 3 $zennit "$@" \
      --json $out/$tag-mobilenetv2-b1-$rule.json
done
python tools/bench.py --summarize "$out/$tag-*.json"
