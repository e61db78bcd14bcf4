#!/usr/bin/env bash
# Install Mist into a persistent folder (the one that survives a cloud server's shutdown), with its own Python
# environment and a launcher:   bash install.sh [--dry-run] FOLDER   (e.g. /home/featurize/work or /root/autodl-tmp)
#
# In FOLDER: mist-env/ (the Python environment), bin/mist (the launcher: run FOLDER/bin/mist, nothing to activate),
# models/ (download-model's checkpoint), huggingface/ and .cache/pip/ (caches). The launcher lives in bin/ so that it
# can never collide with a clone of Mist in FOLDER/mist. Running this again after a restart finishes in seconds when
# nothing changed; after `git pull` it reinstalls the package only; a broken environment is rebuilt.
# --dry-run prints what would be done, and changes nothing.
#
# Which PyTorch: MIST_TORCH_INDEX (a wheel index URL) if set; else, on an NVIDIA GPU, the Python's own PyTorch when it
# already runs CUDA and is new enough (a provider's preinstalled, driver-matched build; not with MIST_TORCH set); else
# the PyTorch index that matches the driver's CUDA version (nvidia-smi; mapping in src/mist/models/cuda_driver.py); without an
# NVIDIA GPU, pip's default index. MIST_TORCH: the requirement (default "torch", e.g. "torch==2.13.0"). PYTHON: the
# interpreter to build on (default python3).
set -euo pipefail

die() { echo "install.sh: $*" >&2; exit 1; }

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
if [ -z "${1:-}" ]; then
    echo "usage: bash install.sh [--dry-run] PERSISTENT_FOLDER   (e.g. /home/featurize/work or /root/autodl-tmp)" >&2
    exit 2
fi
source_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    die "Mist needs Python 3.10 or newer; '$python' is $("$python" --version 2>&1 || echo 'not runnable')"
fi
target="$("$python" -c 'import os, sys; print(os.path.abspath(sys.argv[1]))' "$1")"
env_dir="$target/mist-env"
launcher="$target/bin/mist"

# --- refuse what would be overwritten or cannot work ------------------------------------------------------------
if [ -e "$target" ] && [ ! -d "$target" ]; then die "$target is a file, not a folder"; fi
if [ -e "$target/bin" ] && [ ! -d "$target/bin" ]; then
    die "$target/bin is a file; the launcher goes in that folder: move it away and run again"
fi
if [ -d "$launcher" ]; then die "$launcher is a folder; the launcher must be written there: move it away and run again"; fi
if [ -e "$env_dir" ] && [ ! -f "$env_dir/pyvenv.cfg" ] && [ -n "$(ls -A "$env_dir" 2>/dev/null)" ]; then
    die "$env_dir exists and is not a Python environment: move it away and run again"
fi

# --- which PyTorch ---------------------------------------------------------------------------------------------
torch_requirement="${MIST_TORCH:-torch}"
torch_floor="$(sed -n 's/^ *"torch>=\([0-9.]*\)".*/\1/p' "$source_dir/pyproject.toml")"
# -I: do not put src/mist on sys.path (its module names must not shadow the standard library's).
driver="$("$python" -I "$source_dir/src/mist/models/cuda_driver.py")" || die "could not run $source_dir/src/mist/models/cuda_driver.py"
read -r driver_cuda driver_index <<< "$driver"
system_torch_works() {
    "$python" - "$torch_floor" <<'PY' 2>/dev/null
import sys
import torch
version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
floor = tuple(int(part) for part in sys.argv[1].split(".")[:2])
sys.exit(0 if version >= floor and torch.cuda.is_available() else 1)
PY
}
if [ -n "${MIST_TORCH_INDEX:-}" ]; then
    torch_source="$MIST_TORCH_INDEX"; torch_why="MIST_TORCH_INDEX"
elif [ "$driver_cuda" != none ] && [ -z "${MIST_TORCH:-}" ] && system_torch_works; then
    torch_source=system; torch_why="$python already has PyTorch $("$python" -c 'import torch; print(torch.__version__)') running CUDA"
elif [ "$driver_index" != none ]; then
    torch_source="$driver_index"; torch_why="the NVIDIA driver supports CUDA $driver_cuda"
elif [ "$driver_cuda" = unknown ]; then
    echo "WARNING: an NVIDIA driver is loaded but nvidia-smi did not report its CUDA version; installing PyTorch from" \
         "pip's default index, which may need a newer driver. Set MIST_TORCH_INDEX to choose (see docs/cloud.md)." >&2
    torch_source=default; torch_why="driver version unknown"
elif [ "$driver_cuda" != none ]; then
    die "the NVIDIA driver supports CUDA $driver_cuda only, older than every PyTorch build Mist runs on (CUDA 11.8" \
        "or newer): choose a machine image with a newer driver, or set" \
        "MIST_TORCH_INDEX=https://download.pytorch.org/whl/cpu to install the (much slower) CPU build on purpose"
else
    torch_source=default; torch_why="no NVIDIA GPU found"
fi
torch_index_args=()
case "$torch_source" in
    default|system) ;;
    *) torch_index_args=(--index-url "$torch_source") ;;
esac

# --- the environment's state -------------------------------------------------------------------------------------
python_version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
want_system_site=false; [ "$torch_source" = system ] && want_system_site=true
torch_record="$env_dir/.mist-torch"  # the PyTorch requirement and source the environment was built with
env_action=create
if [ -f "$env_dir/pyvenv.cfg" ]; then
    if ! env_version="$("$env_dir/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)"; then
        env_action="rebuild (its Python no longer runs)"
    elif [ "$env_version" != "$python_version" ]; then
        env_action="rebuild (built with Python $env_version, now $python_version)"
    elif ! "$env_dir/bin/python" -m pip --version >/dev/null 2>&1; then
        env_action="rebuild (its pip is broken)"
    elif ! grep -qix "include-system-site-packages *= *$want_system_site" "$env_dir/pyvenv.cfg"; then
        env_action="rebuild (PyTorch now comes from $torch_source)"
    elif [ "$(cat "$torch_record" 2>/dev/null)" != "$torch_requirement $torch_source" ]; then
        env_action="rebuild (PyTorch now $torch_requirement from $torch_source)"
    else
        env_action=keep
    fi
fi

echo "Mist install into $target$([ $dry_run = 1 ] && echo ' (dry run: nothing is changed)')"
echo "  Python environment: $env_dir ($env_action)"
case "$torch_source" in
    system) torch_text="reused from $python" ;;
    default) torch_text="$torch_requirement from pip's default index" ;;
    *) torch_text="$torch_requirement from $torch_source" ;;
esac
echo "  PyTorch: $torch_text ($torch_why)"
echo "  launcher: $launcher"
if [ $dry_run = 1 ]; then exit 0; fi

# --- build -----------------------------------------------------------------------------------------------------
mkdir -p "$target/bin"
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$target/.cache/pip}"  # in the persistent folder: a rebuild reuses downloads
# What the installed environment was built from: the package sources, the PyTorch choice and the interpreter.
stamp="$( (cd "$source_dir" && find src/mist pyproject.toml -type f ! -name '*.pyc' -print0 | sort -z \
           | xargs -0 sha256sum; echo "$torch_requirement $torch_source"; "$python" --version) | sha256sum | cut -d' ' -f1)"
stamp_file="$env_dir/.mist-install-stamp"

if [ "$env_action" = keep ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ] \
        && "$env_dir/bin/python" -c 'import mist, torch' 2>/dev/null; then
    echo "Mist is installed and up to date in $target"
else
    if [ "$env_action" != keep ]; then
        if [ "$env_action" != create ]; then rm -rf "$env_dir"; fi  # only a folder with pyvenv.cfg, checked above
        if [ "$torch_source" = system ]; then
            "$python" -m venv --system-site-packages "$env_dir"
        else
            "$python" -m venv "$env_dir"
        fi
    fi
    "$env_dir/bin/python" -m pip install --quiet --upgrade pip || echo "note: could not upgrade pip; continuing"
    if [ "$torch_source" != system ] && ! "$env_dir/bin/python" -c 'import torch' 2>/dev/null; then
        echo "installing PyTorch ($torch_text) into $env_dir; about 1-3 GB on a GPU server ..."
        "$env_dir/bin/python" -m pip install "${torch_index_args[@]}" "$torch_requirement" \
            || die "pip could not install $torch_requirement from $torch_source; set MIST_TORCH_INDEX (a PyTorch" \
                   "wheel index, e.g. a mirror of download.pytorch.org) or MIST_TORCH (e.g. torch==2.6.0) and run again"
    fi
    echo "$torch_requirement $torch_source" > "$torch_record"
    echo "installing Mist into $env_dir ..."
    "$env_dir/bin/python" -m pip install "$source_dir[webui]"
    echo "$stamp" > "$stamp_file"
fi
# Lets Mist find this folder's models also when it is run without the launcher (WORK/mist-env/bin/python mist_v3.py).
echo "$target" > "$env_dir/mist-home"

cat > "$launcher.tmp" <<LAUNCHER
#!/bin/sh
# Mist launcher written by install.sh: models, caches and the environment all live in $target.
export MIST_HOME="$target"
export MIST_LAUNCHER="$launcher"
export HF_HOME="\${HF_HOME:-$target/huggingface}"
exec "$env_dir/bin/mist" "\$@"
LAUNCHER
chmod +x "$launcher.tmp"
mv -f "$launcher.tmp" "$launcher"
"$launcher" --version >/dev/null || die "the launcher $launcher does not run; rerun this script (it rebuilds what broke)"
if [ "$driver_cuda" != none ]; then
    problem="$("$env_dir/bin/python" -c 'from mist.models.device import cuda_problem; print(cuda_problem() or "")')"
    if [ -n "$problem" ]; then echo "WARNING: $problem" >&2; fi
fi
echo "Run Mist with:  $launcher protect IMAGES -o OUTPUT   (first: $launcher download-model, then $launcher doctor)"
