#!/usr/bin/env bash
# Create the mergekit oracle environment (.venv-mergekit) used by the parity tests.
#
# Idempotent: when the venv already imports mergekit 0.1.5 on torch 2.13.0, it does nothing.
# torch is pinned to 2.13.0 on purpose: this machine keeps a CPU wheel of that release on
# disk, and an unpinned torch makes pip fetch a multi-GB CUDA build.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${MERGEKIT_VENV:-$ROOT/.venv-mergekit}"
TORCH_VERSION="2.13.0"
MERGEKIT_VERSION="0.1.5"
PYTHON="${PYTHON:-python3}"

check() {
    "$VENV/bin/python" - "$TORCH_VERSION" "$MERGEKIT_VERSION" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
import torch  # noqa: F401
import mergekit.merge_methods  # noqa: F401
assert version("torch").split("+")[0] == sys.argv[1], version("torch")
assert version("mergekit") == sys.argv[2], version("mergekit")
PY
}

if [ -x "$VENV/bin/python" ] && check; then
    echo "mergekit environment ready: $VENV"
    exit 0
fi

"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# Share the project venv's packages (torch, transformers, ...) read-only through a .pth
# line placed after the oracle's own site-packages: pip then installs only what mergekit
# adds, into the oracle venv, and the project venv never sees mergekit.
MAIN_SITE="$ROOT/.venv/lib/python$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages"
if [ -d "$MAIN_SITE" ]; then
    OWN_SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$MAIN_SITE" > "$OWN_SITE/zz-project-venv.pth"
fi
# torch first, alone, so mergekit's own `torch>=...` requirement is already satisfied.
"$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
"$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" "mergekit==$MERGEKIT_VERSION"

if ! check; then
    echo "mergekit environment at $VENV does not import mergekit $MERGEKIT_VERSION on torch $TORCH_VERSION" >&2
    exit 1
fi
echo "mergekit environment ready: $VENV"
