#!/usr/bin/env bash
# Set everything up, then run a shipped example workflow end to end through real ComfyUI.
#   bash scripts/quickstart.sh [workflow.json] [--checkpoint NAME] [--models DIR]
# $PYTHON (else python3) is the Python both steps use.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bash "$here/scripts/setup.sh"
exec "${PYTHON:-python3}" "$here/scripts/run_workflow.py" "$@"
