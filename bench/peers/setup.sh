#!/usr/bin/env bash
# Create the peer-benchmark environment .venv-bench (separate from upweight's .venv):
# torch 2.13.0 CPU (the build on local disk, as in .venv), upweight itself (editable), then each
# peer library of requirements.txt at its newest version that installs with torch 2.13.
# A peer that fails to install is recorded in .venv-bench/peer-install.log and skipped.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS="$REPO/bench/peers"
VENV="${VENV_BENCH:-$REPO/.venv-bench}"
PYTHON="${PYTHON:-python3.11}"
CONS="$PEERS/constraints.txt"
LOG="$VENV/peer-install.log"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV" || exit 1
fi
PIP=("$VENV/bin/python" -m pip)
# keep the environment out of git (python3.11's venv does not write this file itself)
[ -f "$VENV/.gitignore" ] || echo '*' > "$VENV/.gitignore"

"${PIP[@]}" install -q --upgrade pip || exit 1
# torch first, exactly the version of upweight's .venv (the CPU wheel pip finds in its find-links
# directory here; the constraints file then stops every peer from replacing it).
"${PIP[@]}" install -q -c "$CONS" "torch==2.13.0" || exit 1
"${PIP[@]}" install -q -c "$CONS" -e "$REPO[sklearn]" || exit 1
: > "$LOG"
status=0
while read -r req; do
    case "$req" in ''|'#'*) continue ;; esac
    echo "== $req" | tee -a "$LOG"
    if "${PIP[@]}" install -q -c "$CONS" "$req" >>"$LOG" 2>&1; then
        echo "   installed" | tee -a "$LOG"
    else
        echo "   FAILED (see $LOG)" | tee -a "$LOG"
        status=1
    fi
done < "$PEERS/requirements.txt"
# kronfluence requires torchvision, and pip takes PyPI's torchvision (a CUDA build) whose ops do not load
# against the CPU torch; nothing benchmarked imports it, but transformers (W5) imports it when it is
# installed and then fails. Remove it when it cannot be imported.
if "$VENV/bin/python" -m pip show -q torchvision >/dev/null 2>&1 && ! "$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1; then
    echo "== torchvision $("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('torchvision'))") does not import with this torch: uninstalled (nothing benchmarked needs it)" | tee -a "$LOG"
    "${PIP[@]}" uninstall -q -y torchvision >>"$LOG" 2>&1
fi
"$VENV/bin/python" - <<'PY' | tee -a "$LOG"
import importlib.metadata as md
for name in ("torch", "upweight", "pydvl", "captum", "kronfluence", "dattri", "transformers", "numpy", "scipy"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} NOT INSTALLED")
PY
"$VENV/bin/python" -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else f'torch changed to {v}')" || exit 1
touch "$VENV/.installed"
exit $status
