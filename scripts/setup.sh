#!/usr/bin/env bash
# Install what the pack, its tests and the quick start need into one Python ($PYTHON, else python3),
# beside real ComfyUI (found, or cloned at the release the pack is tested with).
# torch is never installed, upgraded or downgraded where it already imports: a user's ComfyUI owns it.
# Safe to run again: pip and apt skip what is already there.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"

# The ComfyUI release the pack is tested with, and the versions of torch installed where none is.
COMFYUI_REPOSITORY="${COMFYUI_REPOSITORY:-https://github.com/comfyanonymous/ComfyUI}"
COMFYUI_TAG="v0.8.0"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

comfyui="${COMFYUI_PATH:-}"
if [ -z "$comfyui" ] && [ "$(basename "$(dirname "$here")")" = custom_nodes ]; then
  comfyui="$(dirname "$(dirname "$here")")"
fi
[ -n "$comfyui" ] || comfyui="$HOME/ComfyUI"

if [ ! -f "$comfyui/main.py" ]; then
  if [ -e "$comfyui" ] && [ -n "$(ls -A "$comfyui" 2>/dev/null)" ]; then
    echo "!!! $comfyui exists but holds no ComfyUI (no main.py). Point COMFYUI_PATH at your ComfyUI and run again." >&2
    exit 2
  fi
  echo ">>> ComfyUI not found: cloning $COMFYUI_REPOSITORY at $COMFYUI_TAG into $comfyui"
  if ! git -c advice.detachedHead=false clone --quiet --depth 1 --branch "$COMFYUI_TAG" "$COMFYUI_REPOSITORY" "$comfyui"; then
    rm -rf "$comfyui"
    echo "!!! Could not clone ComfyUI. Get it, then run this again:" >&2
    echo "!!!   git clone --branch $COMFYUI_TAG $COMFYUI_REPOSITORY \"$comfyui\"" >&2
    echo "!!! (or set COMFYUI_PATH to a ComfyUI you already have)" >&2
    exit 2
  fi
fi

# torch: left exactly as it is wherever it imports. Every later install is held to the torch,
# torchvision and torchaudio versions found here, so no dependency can swap them either.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
if torch_version="$("$python" -c 'import torch; print(torch.__version__)' 2>/dev/null)"; then
  echo ">>> torch $torch_version is installed: left as it is"
else
  echo ">>> no torch in $("$python" -c 'import sys; print(sys.prefix)'): installing ${TORCH_PINS[*]} (the versions the pack is tested with)"
  "$python" -m pip install -q "${TORCH_PINS[@]}"
fi
"$python" - "$constraints" <<'EOF'
import sys
from importlib import metadata
with open(sys.argv[1], "w") as constraints:
    for name in ("torch", "torchvision", "torchaudio"):
        try:
            constraints.write(f"{name}=={metadata.version(name)}\n")
        except metadata.PackageNotFoundError:
            pass
EOF
pip_install() { "$python" -m pip install -q -c "$constraints" "$@"; }

# ComfyUI's requirements name torch, torchvision and torchaudio unpinned: they are left out here.
# torchaudio is not installable everywhere; without it ComfyUI only loses its audio nodes.
comfyui_requirements="$(mktemp)"
grep -vE '^(torch|torchvision|torchaudio)([<>=~ ]|$)' "$comfyui/requirements.txt" > "$comfyui_requirements" || true  # 1: nothing left
pip_install -r "$comfyui_requirements"
rm -f "$comfyui_requirements"
# ComfyUI-Manager, for the install-through-Manager tests (ComfyUI pins its version).
[ -f "$comfyui/manager_requirements.txt" ] && pip_install -r "$comfyui/manager_requirements.txt"
pip_install -r "$here/requirements.txt"
pip_install -r "$here/tests/requirements.txt"

# Debian's Chromium drives the real frontend in the browser tests (no browser download).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "!!! could not install chromium: browser tests will be skipped" >&2
fi
echo ">>> set up: ComfyUI at $comfyui"
