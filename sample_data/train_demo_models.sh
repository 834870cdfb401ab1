#!/usr/bin/env bash
# Regenerate the synthetic data, train baseline / FEBS / MoE / dMoE with the SAME budget (steps, batch, seed:
# training/demo-*.yaml) on the 2D fundus and 3D prostate sets, evaluate each on the held-out test split,
# write the fairness benchmark to sample_data/results/ and ship the two dMoE models as the demo models
# (napari_dmoe/assets/models/{fundus,prostate}-dmoe.safetensors).
# The 2D dMoE recipe adds a load-balancing loss (aux_loss 0.1): without it its routers collapse onto one expert.
#
#   bash sample_data/train_demo_models.sh            # full run: about 25 min on 2 CPU cores
#   bash sample_data/train_demo_models.sh --quick    # pipeline check in about a minute; writes only to a temp folder
#
# The 2D and 3D lanes run side by side, one thread each (small models use threads poorly).
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1
METHODS=(baseline febs moe dmoe)
if ((QUICK)); then
    WORK=$(mktemp -d /tmp/dmoe-demo-quick.XXXXXX)
    DATA=$WORK/data RUNS=$WORK/runs RESULTS=$WORK/results
    GEN_FUNDUS=(--n 48 --n-test 12) GEN_PROSTATE=(--n 24)
    EXTRA=(--set recipe.steps=3 --set recipe.val_every=3)
    EVAL=(--n-boot 50)
    SHIP=()
else
    DATA=$PWD/data/demo RUNS=runs RESULTS=sample_data/results
    GEN_FUNDUS=(--n 600 --n-test 400) GEN_PROSTATE=(--n 160)
    EXTRA=()
    EVAL=(--n-boot 1000)
    SHIP=(--ship napari_dmoe/assets/models)
fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$RESULTS" "$RUNS"

python sample_data/generate.py fundus --out "$DATA" "${GEN_FUNDUS[@]}" --size 128 --seed 0
python sample_data/generate.py prostate --out "$DATA" "${GEN_PROSTATE[@]}" --size 64x64x32 --spacing 3x3x3 --seed 0

lane() {  # lane DATASET SUBFOLDER: train then evaluate every method, one after the other
    local dataset=$1 sub=$2 m cfg out
    for m in "${METHODS[@]}"; do
        cfg=training/demo-$dataset-$m.yaml
        out=$RUNS/demo-$dataset-$m
        rm -rf "$out"  # a fresh run, never a resumed one, so every method gets exactly the same budget
        dmoe train "$cfg" --set data.root="$DATA/$sub" --set output_dir="$out" "${EXTRA[@]}" \
            --events "$out.events.jsonl" --quiet
        dmoe evaluate "$out/best.safetensors" "$cfg" --set data.root="$DATA/$sub" --name "$m" \
            --out "$RESULTS/$dataset/$m" "${EVAL[@]}" --quiet
    done
}

lane fundus fairseg > "$RUNS/lane-fundus.log" 2>&1 &
pid2d=$!
lane prostate prostate > "$RUNS/lane-prostate.log" 2>&1 &
pid3d=$!
status=0
wait "$pid2d" || { status=1; echo "2D lane failed, see $RUNS/lane-fundus.log" >&2; tail -5 "$RUNS/lane-fundus.log" >&2; }
wait "$pid3d" || { status=1; echo "3D lane failed, see $RUNS/lane-prostate.log" >&2; tail -5 "$RUNS/lane-prostate.log" >&2; }
((status == 0)) || exit 1

python sample_data/benchmark_fairness.py --results "$RESULTS" --runs "$RUNS" "${SHIP[@]}" \
    --command "bash sample_data/train_demo_models.sh${1:+ $1}"
((QUICK)) && echo "quick run OK: $WORK"
exit 0
