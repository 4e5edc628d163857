# sourced at the start of every device call
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl >/dev/null 2>&1 || echo "wheel install failed"
export PYTHONPATH=/tmp/site COMFYUI_PATH=$PWD/.device/ComfyUI PYTHONUNBUFFERED=1
mkdir -p bench/out
keep() { find bench/out -type f -size -8M \( -name "*.json" -o -name "*.txt" -o -name "*.md" -o -name "*.log" \) -not -path "*inductor-cache*" -print0 | tar --null -T - -czf "$OUT/$1.tgz"; }
