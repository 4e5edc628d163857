#!/usr/bin/env bash
# Install what the pack, its tests and the quick start need into the current Python, beside real ComfyUI.
# Safe to run again: pip and apt skip what is already there.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"

comfyui="${COMFYUI_PATH:-}"
if [ -z "$comfyui" ] && [ "$(basename "$(dirname "$here")")" = custom_nodes ]; then
  comfyui="$(dirname "$(dirname "$here")")"
fi
[ -n "$comfyui" ] || comfyui="$HOME/ComfyUI"

# torch first, pinned: ComfyUI's requirements name torch unpinned, which would pull another build.
"$python" -m pip install -q torch==2.14.1 torchvision==0.29.1
if [ -f "$comfyui/requirements.txt" ]; then
  # torchaudio is not installable here; without it ComfyUI only loses its audio nodes.
  grep -vE '^(torch|torchvision|torchaudio)([<>=~ ]|$)' "$comfyui/requirements.txt" > /tmp/fewstep-comfyui-requirements.txt
  "$python" -m pip install -q -r /tmp/fewstep-comfyui-requirements.txt
  # ComfyUI-Manager, for the install-through-Manager tests (ComfyUI pins its version).
  [ -f "$comfyui/manager_requirements.txt" ] && "$python" -m pip install -q -r "$comfyui/manager_requirements.txt"
else
  echo "!!! ComfyUI not found at $comfyui (set COMFYUI_PATH): installing only the pack's own requirements" >&2
fi
"$python" -m pip install -q -r "$here/requirements.txt"
"$python" -m pip install -q -r "$here/tests/requirements.txt"

# Debian's Chromium drives the real frontend in the browser tests (no browser download).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "!!! could not install chromium: browser tests will be skipped" >&2
fi
