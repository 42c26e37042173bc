#!/usr/bin/env bash
# torch's TestOptimRenewed against FusedAdam and FusedAdamW on CPU (tests/torch_suite).
#   tests/torch_suite/run.sh              FusedAdam / FusedAdamW (what `pytest tests` runs too)
#   tests/torch_suite/run.sh --baseline   the same tests for torch.optim.Adam / AdamW
# Further arguments go to pytest (-k, -x, ...). Skips are listed with their reasons.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ "${1:-}" == "--baseline" ]]; then
    shift
    export FUSED_ADAM_TORCH_SUITE=torch
fi
exec python -m pytest tests/torch_suite -q -rfEs "$@"
