#!/usr/bin/env bash
# The checks only a CUDA GPU can run, in one go (a few minutes on one GPU), with no network: the CUDA tests
# (tests/test_cuda.py) and every method's speed and peak memory at 512 x 512 in bf16 and fp16
# (benchmarks/gpu_check.py), and Mist v1.2 with and without --compile. Everything goes to one results file.
#
# Run from the repository root on a machine with PyTorch (CUDA), transformers (>= 5), pytest, Pillow, safetensors and
# tqdm installed. Mist runs from src/ (nothing is installed); packages the machine lacks come from wheels in .whl/
# (benchmarks/gpu-env.sh says how to fetch them).
#
#   bash benchmarks/gpu-check.sh [RESULTS_FILE]        (default: gpu-check-results.md)
set -uo pipefail

results=${1:-gpu-check-results.md}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here" || exit 2
source benchmarks/gpu-env.sh || exit 2

{
    echo "# Mist GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    "$python" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'| diffusers', diffusers.__version__, '| transformers', transformers.__version__,
'| GPU:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible to PyTorch')" 2>&1
    echo '```'
} >"$results"

"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "PyTorch sees no CUDA GPU: nothing to check" | tee -a "$results" >&2
    exit 2
}

status=0
{
    echo
    echo "## CUDA tests (tests/test_cuda.py)"
    echo
    echo '```'
} >>"$results"
"$python" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py 2>&1 | tail -40 >>"$results" || status=1
echo '```' >>"$results"

{
    echo
    echo "## Every method at 512 x 512 (benchmarks/gpu_check.py)"
    echo
} >>"$results"
"$python" benchmarks/gpu_check.py --precisions bf16,fp16 --size 512 --steps 2 >>"$results" 2>&1 || status=1

{
    echo
    echo "## Mist v1.2 uncompiled and with --compile (torch.compile, Triton), bf16 at 512 x 512"
    echo
} >>"$results"
"$python" benchmarks/gpu_check.py --methods mist --precisions bf16 --compile no,yes --size 512 --steps 5 \
    >>"$results" 2>&1 || status=1

cat "$results"
exit $status
