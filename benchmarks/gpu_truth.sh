#!/usr/bin/env bash
# GPU truth in one command (issue 28; benchmarks/GPU.md says what to carry and how to read the result):
#
#   bash benchmarks/gpu_truth.sh OUT_DIR [gpu_truth.py options, e.g. --rehearsal]
#
# Installs the carried wheels (WHEELS=folder, default .whl/ at the repository root) that the host
# lacks into a temporary target with `pip install --no-index`, then runs benchmarks/gpu_truth.py
# with that target and the repository on PYTHONPATH. The run stops itself 450 s after this script
# started (the install counts); `timeout` stops it for good at 470 s. OUT_DIR gets gpu.json,
# RESULTS-section.md and traces/ whatever happens.
set -euo pipefail
START=$(date +%s.%N)
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash benchmarks/gpu_truth.sh OUT_DIR [--rehearsal ...]  (see benchmarks/GPU.md)" >&2
    exit 2
fi
OUT=$1; shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=${WHEELS:-$ROOT/.whl}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
TARGET=$(mktemp -d "${TMPDIR:-/tmp}/gpu_truth_wheels.XXXXXX")
trap 'rm -rf "$TARGET"' EXIT

# What the kit imports that this Python lacks, mapped to the wheels that bring it (no dependency
# resolution: the host's own numpy, torch ... stay the ones in use). GPU_TRUTH_INSTALL=all installs
# every carried wheel of the list even where the host has the module (to check the wheels).
PLAN=$("$PY" - "$WHEELS" "${GPU_TRUTH_INSTALL:-missing}" <<'EOF'
import importlib.util, pathlib, sys
wheels, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
needed = {  # import name: (distributions, required by the kit)
    "polars": (["polars", "polars-runtime-32"], True), "msgspec": (["msgspec"], True),
    "nvtx": (["nvtx"], True), "pytest": (["pytest"], False), "pluggy": (["pluggy"], False),
    "iniconfig": (["iniconfig"], False), "scipy": (["scipy"], False),
}
install, lacking = [], []
for module, (dists, required) in needed.items():
    if mode != "all" and importlib.util.find_spec(module) is not None:
        continue
    for dist in dists:
        if any(wheels.glob(dist.replace("-", "_") + "-*.whl")):
            install.append(dist)
        elif mode != "all" or required:
            lacking.append((dist, required))
for dist, required in lacking:
    print(f"gpu_truth.sh: {'ERROR' if required else 'note'}: no wheel for {dist} in {wheels}"
          f"{' (the kit cannot run without it)' if required else ' (the stage that needs it will say so)'}",
          file=sys.stderr)
print("FAIL" if any(r for _, r in lacking) else " ".join(install))
EOF
)
if [ "$PLAN" = "FAIL" ]; then
    echo "gpu_truth.sh: carry the wheels named above in $WHEELS (benchmarks/GPU.md, step 1)" >&2
    exit 2
fi
if [ -n "$PLAN" ]; then
    echo "gpu_truth.sh: installing from $WHEELS into $TARGET: $PLAN"
    if "$PY" -m pip --version >/dev/null 2>&1; then
        # shellcheck disable=SC2086 - the list is meant to split
        "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
            --find-links "$WHEELS" --target "$TARGET" $PLAN
    else  # no pip on the host: a wheel is a zip of what goes into site-packages
        echo "gpu_truth.sh: no pip for $PY; unpacking the wheels into $TARGET instead"
        # shellcheck disable=SC2086
        "$PY" - "$WHEELS" "$TARGET" $PLAN <<'EOF'
import pathlib, sys, zipfile
wheels, target = pathlib.Path(sys.argv[1]), sys.argv[2]
for dist in sys.argv[3:]:
    zipfile.ZipFile(sorted(wheels.glob(dist.replace("-", "_") + "-*.whl"))[-1]).extractall(target)
EOF
    fi
fi
set +e
PYTHONPATH="$ROOT:$TARGET${PYTHONPATH:+:$PYTHONPATH}" timeout -k 5 470 \
    "$PY" "$ROOT/benchmarks/gpu_truth.py" --out "$OUT" --started-at "$START" "$@"
RC=$?
set -e
echo "gpu_truth.sh: exit $RC after $(awk "BEGIN {printf \"%.0f\", $(date +%s.%N) - $START}") s; results in $OUT/gpu.json"
exit $RC
