#!/usr/bin/env bash
# Installs the serving stacks bench/bench_peers.py compares `d2ops serve` with (TorchServe, LitServe) into
# bench/.peers, OUTSIDE the project's runtime install: the project venv is never written to.
#
# How: pip resolves the peers against the project venv (`pip install --dry-run --report`), so that only the
# packages that venv lacks are fetched (torch, numpy, fastapi, uvicorn... are reused from it, never downloaded
# twice), and those are installed with `--target bench/.peers --no-deps`. The bench then runs the peers with the
# project venv's python and PYTHONPATH=bench/.peers. Idempotent: a complete bench/.peers is left as it is.
#
#   bash bench/setup_peers.sh            # PYTHON=/path/to/python overrides the project venv's python
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PY="${PYTHON:-$REPO/.venv/bin/python}"
PEERS="$HERE/.peers"
PINS=(torchserve==0.12.0 torch-model-archiver==0.12.0 litserve==0.2.19)
STAMP="$PEERS/.installed"

[ -x "$PY" ] || { echo "error: no project python at $PY (create the project venv first, or set PYTHON)" >&2; exit 1; }

numpy_before="$("$PY" -c 'import numpy; print(numpy.__version__)')"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "${PINS[*]}" ] \
   && PYTHONPATH="$PEERS" "$PY" -c 'import ts, model_archiver, litserve, zmq' 2>/dev/null; then
    echo "peers already installed in $PEERS (${PINS[*]})"
else
    report="$(mktemp)"
    trap 'rm -f "$report"' EXIT
    # What the project venv lacks for the pinned peers (nothing is installed by a dry run).
    "$PY" -m pip install --quiet --disable-pip-version-check --dry-run --report "$report" "${PINS[@]}" 2>/dev/null
    mapfile -t missing < <("$PY" - "$report" <<'PYEOF'
import json, sys
report = json.load(open(sys.argv[1]))
for item in report["install"]:
    meta = item["metadata"]
    if meta["name"].lower() in {"torch", "numpy", "torchvision"}:
        sys.exit(f"error: the peers would replace the project's {meta['name']} ({meta['version']}); refusing")
    print(f"{meta['name']}=={meta['version']}")
PYEOF
)
    # The pinned peers themselves always go into bench/.peers, even if the project venv happened to have them.
    for pin in "${PINS[@]}"; do
        printf '%s\n' "${missing[@]}" | grep -qix "$pin" || missing+=("$pin")
    done
    echo "installing into $PEERS: ${missing[*]}"
    rm -rf "$PEERS"
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$PEERS" "${missing[@]}"
    echo "${PINS[*]}" > "$STAMP"
fi

numpy_after="$("$PY" -c 'import numpy; print(numpy.__version__)')"
if [ "$numpy_before" != "$numpy_after" ]; then
    echo "error: numpy in the project venv changed ($numpy_before -> $numpy_after)" >&2
    exit 1
fi
PYTHONPATH="$PEERS" "$PY" -c 'import numpy, ts.version, litserve
assert numpy.__version__.startswith("1."), numpy.__version__
print("project numpy", numpy.__version__, "| torchserve", ts.version.__version__, "| litserve", litserve.__version__)'

if command -v java >/dev/null 2>&1; then
    echo "java: $(java -version 2>&1 | head -1)"
else
    echo "WARNING: no Java runtime on PATH: TorchServe's frontend needs Java 11+ (Debian/Ubuntu:" \
         "sudo apt-get install -y openjdk-17-jre-headless). bench/bench_peers.py will skip TorchServe." >&2
fi
