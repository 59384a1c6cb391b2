#!/usr/bin/env bash
# sweeps/matched_baselines.sh [extra overrides...]      (SEEDS=0,1,2 by default; PYTHON=python)
#
# Width-matched comparison in the benchmark setting (conf/experiment/fmnist_mlp2048.yaml):
#   1. vanilla and hashed runs, one per seed              (experiment=sweep_fmnist_mlp2048)
#   2. magnitude pruning and random merging that follow each hashed run's widths rehash by rehash
#      (hashing.width_plan=<that run's dir>, no per-rehash ratio cap)
#   3. a small network trained from scratch at each hashed run's final widths (experiment=small_from_scratch)
#   4. the table and plots of all of it:  <root>/results/results.md
# Everything lands under $HASHEXP_OUTPUTS/multirun/<date>/<time>_matched_fmnist_mlp2048/.
# Extra arguments go to every run, e.g. `trainer.epochs=2 dataset.subset_train=5000` for a quick pass
# (not seed or model.widths: the script sets those).
set -euo pipefail
PY=${PYTHON:-python}
SEEDS=${SEEDS:-0,1,2}
OUT=${HASHEXP_OUTPUTS:-outputs}
ROOT="$OUT/multirun/$(date +%Y-%m-%d)/$(date +%H-%M-%S)_matched_fmnist_mlp2048"

# extra arguments first: the script's own overrides (seeds, plans, widths, dirs) must win
"$PY" -m hashexp -m experiment=sweep_fmnist_mlp2048 "$@" "seed=$SEEDS" "hydra.sweep.dir=$ROOT/hashed"

for seed in ${SEEDS//,/ }; do
  hashed=$(ls -d "$ROOT"/hashed/*_simhash_s"$seed" 2>/dev/null | head -n1 || true)
  if [[ -z "$hashed" || ! -f "$hashed/metrics.json" ]]; then
    echo "matched_baselines: the hashed run of seed $seed did not finish; skipping its baselines" >&2
    continue
  fi
  # final widths as an override value, sites in model order: [w_fc1,w_fc2,...]
  widths=$("$PY" -c '
import json, re, sys
w = json.load(open(sys.argv[1]))["widths"]
key = lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
print("[" + ",".join(str(w[k]) for k in sorted(w, key=key)) + "]")' "$hashed/metrics.json")
  "$PY" -m hashexp -m experiment=fmnist_mlp2048 "$@" hashing=magnitude,random "++hashing.width_plan=$hashed" \
      ++hashing.target_ratio=null "seed=$seed" "hydra.sweep.dir=$ROOT/baselines_s$seed"
  "$PY" -m hashexp experiment=small_from_scratch "$@" "model.widths=$widths" "seed=$seed" \
      "hydra.run.dir=$ROOT/scratch_s$seed"
done

"$PY" -m hashexp.results "$ROOT" --out "$ROOT/results"
