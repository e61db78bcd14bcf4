#!/usr/bin/env bash
# Install Mist into a persistent folder (the one that survives a cloud server's shutdown), with its own Python
# environment and a launcher:  bash install.sh /home/featurize/work   (or /root/autodl-tmp, or any folder)
# Afterwards run  /home/featurize/work/mist protect ...  : no activation step. Running this again after a restart
# finishes in seconds when nothing changed; after `git pull` it reinstalls the package only.
# MIST_TORCH: the PyTorch requirement to install (default: torch, PyPI's build; e.g. "torch==2.13.0").
set -euo pipefail

target="${1:-}"
if [ -z "$target" ]; then
    echo "usage: bash install.sh PERSISTENT_FOLDER   (e.g. /home/featurize/work or /root/autodl-tmp)" >&2
    exit 2
fi
source_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$target"
target="$(cd "$target" && pwd)"
env_dir="$target/mist-env"
python="${PYTHON:-python3}"
torch_requirement="${MIST_TORCH:-torch}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "install.sh: Mist needs Python 3.10 or newer; '$python' is $("$python" --version 2>&1)" >&2
    exit 1
fi

# What the installed environment was built from: the package sources, the torch requirement and the interpreter.
stamp="$( (cd "$source_dir" && find src/mist pyproject.toml -type f ! -name '*.pyc' -print0 | sort -z \
           | xargs -0 sha256sum; echo "$torch_requirement"; "$python" --version) | sha256sum | cut -d' ' -f1)"
stamp_file="$env_dir/.mist-install-stamp"

if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] \
        && "$env_dir/bin/python" -c 'import mist, torch' 2>/dev/null; then
    echo "Mist is installed and up to date in $target"
else
    export PIP_CACHE_DIR="$target/.cache/pip"  # kept in the persistent folder: a rebuilt environment reuses downloads
    [ -x "$env_dir/bin/python" ] || "$python" -m venv "$env_dir"
    "$env_dir/bin/python" -m pip install --quiet --upgrade pip
    if ! "$env_dir/bin/python" -c 'import torch' 2>/dev/null; then
        echo "installing PyTorch ($torch_requirement) into $env_dir ..."
        "$env_dir/bin/python" -m pip install --quiet "$torch_requirement"
    fi
    echo "installing Mist into $env_dir ..."
    "$env_dir/bin/python" -m pip install --quiet "$source_dir[webui]"
    echo "$stamp" > "$stamp_file"
fi

launcher="$target/mist"
cat > "$launcher.tmp" <<LAUNCHER
#!/bin/sh
# Mist launcher written by install.sh: models, caches and the environment all live in $target.
export MIST_HOME="$target"
export HF_HOME="\${HF_HOME:-$target/huggingface}"
exec "$env_dir/bin/mist" "\$@"
LAUNCHER
chmod +x "$launcher.tmp"
mv "$launcher.tmp" "$launcher"
echo "Run Mist with:  $launcher protect IMAGES -o OUTPUT   (first: $launcher download-model, then $launcher doctor)"
