#!/usr/bin/env bash
# The whole evaluation protocol of issue 25 in one go, for a CUDA machine with a local Stable Diffusion checkpoint:
# ORIGINALS protected with each method at each budget, each protected set purified with every purifier of the
# default list and mimicked (img2img at 0.25 / 0.35 / 0.5 and LoRA fine-tuning), the answer per method and budget in
# OUTDIR/index.html (`mist compare`), and a summary of the run (machine, versions, command, time, answers) in
# OUTDIR/protocol.md. Nothing is downloaded: the model is a file or folder on this machine.
#
#   bash benchmarks/gpu-protocol.sh ORIGINALS OUTDIR [MORE MIST COMPARE OPTIONS...]
#
# Settings (environment): MODEL (default models/ldm/stable-diffusion-v1/model.ckpt), METHODS (default
# mist,photoguard,pid,sds,mist2), BUDGETS (default 4,8,16, in 0..255 levels), DEVICE (default cuda; `cpu` runs the
# same protocol on a CPU, which takes days at full size: meant for trying the script on `MODEL=tiny-random`).
# PYTHON (default python3): the Python that has Mist's packages.
# Options after OUTDIR go to `mist compare` after the protocol's own, so they win (`--protect-steps 50`,
# `--purify jpeg:75,vae`, `--upscaler DIR`, ...). Run the same command again to go on after an interruption.
#
# Cost: methods x budgets protections (100 PGD steps each) and as many evaluations, each one every purification of the default list x
# (3 img2img strengths + LoRA) on the clean and the protected set; start with 2-3 images.
#
# Runs from a checkout: Mist from src/, packages the machine lacks from wheels in .whl/ (see benchmarks/gpu-env.sh).
set -uo pipefail

if [ $# -lt 2 ]; then
    echo "usage: bash benchmarks/gpu-protocol.sh ORIGINALS OUTDIR [MIST COMPARE OPTIONS...]" >&2
    exit 2
fi
originals=$(realpath -m -- "$1")
out=$(realpath -m -- "$2")
shift 2
model=${MODEL:-models/ldm/stable-diffusion-v1/model.ckpt}
[ -e "$model" ] && model=$(realpath -- "$model")  # a path is read from where the command was typed
device=${DEVICE:-cuda}
cd "$(dirname "$0")/.." || exit 2
source benchmarks/gpu-env.sh || exit 2

if ! "$python" -c "import torch" >/dev/null 2>&1; then
    echo "gpu-protocol: $python cannot import torch (set PYTHON to the Python that has Mist's packages)" >&2
    exit 2
fi
if [ "$device" = cuda ] && ! "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-protocol: PyTorch sees no CUDA GPU (set DEVICE=cpu to run the protocol on the CPU anyway)" >&2
    exit 2
fi

command=(compare "$originals" -o "$out" --methods "${METHODS:-mist,photoguard,pid,sds,mist2}"
         --budgets "${BUDGETS:-4,8,16}" --lora --model "$model" --device "$device" "$@")
mkdir -p -- "$out" || exit 2
log="$out/protocol.log"
started=$(date +%s)
"$python" -c "import sys; from mist.faces.cli import main; sys.exit(main(sys.argv[1:]))" "${command[@]}" 2>&1 \
    | tee "$log"
status=${PIPESTATUS[0]}
seconds=$(( $(date +%s) - started ))

summary="$out/protocol.md"
{
    echo "# Mist evaluation protocol, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo '```'
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    fi
    lscpu 2>/dev/null | sed -n 's/^Model name: *//p'
    "$python" -c "import torch, diffusers, transformers; print('torch', torch.__version__, '| diffusers',
diffusers.__version__, '| transformers', transformers.__version__)" 2>&1
    echo "mist ${command[*]}"
    echo "exit status $status after $seconds s"
    echo '```'
    echo
    echo "## Answers (method-eBUDGET: mimicry: decision (effect))"
    echo
    grep -E '^[a-z0-9_-]+-e[0-9.]+: ' "$log" | sed 's/^/- /'
    if grep -q '"random_weights": true' "$out/comparison.json" 2>/dev/null; then
        echo
        echo "The model has random weights: these answers say nothing about protection."
    fi
    echo
    echo "The full comparison: index.html (each arm's report under reports/), comparison.json, comparison.csv."
} >"$summary"
echo "protocol summary: $summary"
exit "$status"
