#!/usr/bin/env bash
# Regenerate the synthetic data, train the demo models with the SAME budget per data set (steps, batch, seed:
# training/demo-*.yaml), evaluate each on the held-out test split, write the fairness benchmark to
# sample_data/results/ and ship the dMoE models as the demo models (napari_dmoe/assets/models/<lane>-dmoe.safetensors).
#   fundus   (2D, race):      baseline / FEBS / MoE / dMoE
#   prostate (3D, T stage):   baseline / FEBS / MoE / dMoE
#   skin     (2D, age group): baseline / dMoE only (the demo model for the napari skin sample; FEBS and MoE left out
#                             to keep the CPU cost down)
# The 2D dMoE recipes add a load-balancing loss (aux_loss 0.1): without it the routers collapse onto one expert.
#
#   bash sample_data/train_demo_models.sh              # full run, all lanes: about 35 min on 2 CPU cores
#   bash sample_data/train_demo_models.sh skin         # only the named lanes (fundus, prostate, skin); the summary
#                                                      # is rebuilt from every report present, only these ship
#   bash sample_data/train_demo_models.sh --quick      # pipeline check in about 2 minutes; writes only to a temp folder
#
# The lanes run side by side, one thread each (small models use threads poorly).
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
LANES=()
for arg in "$@"; do
    case $arg in
        --quick) QUICK=1 ;;
        fundus|prostate|skin) LANES+=("$arg") ;;
        *) echo "usage: bash sample_data/train_demo_models.sh [--quick] [fundus] [prostate] [skin]" >&2; exit 2 ;;
    esac
done
((${#LANES[@]})) || LANES=(fundus prostate skin)
declare -A METHODS=([fundus]="baseline febs moe dmoe" [prostate]="baseline febs moe dmoe" [skin]="baseline dmoe")
declare -A SUBFOLDER=([fundus]=fairseg [prostate]=prostate [skin]=ham10000)
if ((QUICK)); then
    WORK=$(mktemp -d /tmp/dmoe-demo-quick.XXXXXX)
    DATA=$WORK/data RUNS=$WORK/runs RESULTS=$WORK/results
    GEN_FUNDUS=(--n 48 --n-test 12) GEN_PROSTATE=(--n 24) GEN_SKIN=(--n 80)
    EXTRA=(--set recipe.steps=3 --set recipe.val_every=3)
    EVAL=(--n-boot 50)
    SHIP=()
else
    DATA=$PWD/data/demo RUNS=runs RESULTS=sample_data/results
    GEN_FUNDUS=(--n 600 --n-test 400) GEN_PROSTATE=(--n 160) GEN_SKIN=(--n 2000)
    EXTRA=()
    EVAL=(--n-boot 1000)
    SHIP=(--ship napari_dmoe/assets/models)
fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$RESULTS" "$RUNS"

generate() {  # generate LANE: the lane's data set, seeded (byte-identical on every run)
    case $1 in
        fundus) python sample_data/generate.py fundus --out "$DATA" "${GEN_FUNDUS[@]}" --size 128 --seed 0 ;;
        prostate) python sample_data/generate.py prostate --out "$DATA" "${GEN_PROSTATE[@]}" --size 64x64x32 \
                      --spacing 3x3x3 --seed 0 ;;
        # the napari skin sample's size; the loader resizes to the model's 128 x 128 input, as for real HAM10000
        skin) python sample_data/generate.py skin --out "$DATA" "${GEN_SKIN[@]}" --size 150x200 --seed 0 ;;
    esac
}

lane() {  # lane DATASET: train then evaluate each of its methods, one after the other
    local dataset=$1 sub=${SUBFOLDER[$1]} m cfg out
    for m in ${METHODS[$dataset]}; do
        cfg=training/demo-$dataset-$m.yaml
        out=$RUNS/demo-$dataset-$m
        rm -rf "$out"  # a fresh run, never a resumed one, so every method gets exactly the same budget
        dmoe train "$cfg" --set data.root="$DATA/$sub" --set output_dir="$out" "${EXTRA[@]}" \
            --events "$out.events.jsonl" --quiet
        # --overwrite: this script exists to regenerate the committed reports of the model it just trained
        dmoe evaluate "$out/best.safetensors" "$cfg" --set data.root="$DATA/$sub" --name "$m" \
            --out "$RESULTS/$dataset/$m" "${EVAL[@]}" --quiet --overwrite
    done
}

for name in "${LANES[@]}"; do generate "$name"; done
declare -A PIDS=()
for name in "${LANES[@]}"; do
    lane "$name" > "$RUNS/lane-$name.log" 2>&1 &
    PIDS[$name]=$!
done
status=0
for name in "${LANES[@]}"; do
    wait "${PIDS[$name]}" || { status=1; echo "$name lane failed, see $RUNS/lane-$name.log" >&2
                               tail -5 "$RUNS/lane-$name.log" >&2; }
done
((status == 0)) || exit 1

python sample_data/benchmark_fairness.py --results "$RESULTS" --runs "$RUNS" --datasets "${LANES[@]}" "${SHIP[@]}" \
    --command "bash sample_data/train_demo_models.sh${*:+ $*}"
((QUICK)) && echo "quick run OK: $WORK"
exit 0
