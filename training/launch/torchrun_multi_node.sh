#!/usr/bin/env bash
# Several machines: run this on every node with the same MASTER_ADDR (node 0's address) and its own NODE_RANK.
# The output_dir must be on a filesystem every node sees (resume state, checkpoints); only global rank 0 writes.
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 bash training/launch/torchrun_multi_node.sh training/ham10000-age-dmoe.yaml
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=1 bash training/launch/torchrun_multi_node.sh training/ham10000-age-dmoe.yaml
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [dmoe train options...]}
shift
: "${MASTER_ADDR:?set MASTER_ADDR to node 0}" "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}"
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-dmoe}" \
  -m napari_dmoe.cli.main train "$CONFIG" "$@"
