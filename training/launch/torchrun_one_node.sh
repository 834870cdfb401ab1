#!/usr/bin/env bash
# One machine, N GPUs (or N CPU processes with --device cpu). recipe.batch_size is the GLOBAL batch: it is split
# across the processes, so the same config gives the same schedule and (nearly) the same curve on 1 or N GPUs.
#   bash training/launch/torchrun_one_node.sh training/fairseg-race-dmoe.yaml 4 --set data.root=/data/FairSeg
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [NPROC] [dmoe train options...]}
NPROC=${2:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
shift $(( $# >= 2 ? 2 : 1 ))
exec torchrun --standalone --nproc_per_node "$NPROC" -m napari_dmoe.cli.main train "$CONFIG" --events "runs/$(basename "$CONFIG" .yaml).events.jsonl" "$@"
