# Sourced by the GPU scripts (gpu-check.sh, gpu-protocol.sh), from the repository root: makes Mist importable from
# src/ without installing it, and installs the wheels in .whl/ (if that folder exists) into a private folder, never
# over the machine's own packages. A GPU machine without network gets its missing packages (diffusers, usually) that
# way; fetch them beforehand on a machine with network access, for the GPU machine's Python (3.12 here):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1
#
# Sets `python` (from $PYTHON, default python3); returns 2 when the wheels do not install.
python=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d /tmp/mist-gpu-site.XXXXXX)
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || return 2
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
