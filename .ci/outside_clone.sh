#!/usr/bin/env bash
# The workbook outside a clone, as a reader who only has the package would run it:
# build the wheel, install it into a fresh virtual environment outside the repository,
# copy only the notebooks into an empty folder, and run them there with strict nbval.
#
# It also runs them as a machine unlike this one would: generic CPU kernels (no AVX),
# oneDNN limited to SSE4.1, one thread. Stored outputs must hold there too.
#
#   bash .ci/outside_clone.sh            (make test-outside-clone)
#   TORCH="torch" bash .ci/outside_clone.sh    another PyTorch wheel, as in the Makefile
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
torch_spec="${TORCH:-torch==2.13.0}"
work="$(mktemp -d "${TMPDIR:-/tmp}/hdn-outside-clone.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# pip's notes about local index folders that this machine lacks are noise; its errors stay
quiet() { "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }

echo "== building the wheel"
"$repo/.venv/bin/python" -m build --wheel --outdir "$work/dist" "$repo" >"$work/build.log" 2>&1 \
  || { cat "$work/build.log"; exit 1; }
wheel="$(ls "$work"/dist/hdn-*.whl)"
echo "   $(basename "$wheel")"

echo "== fresh virtual environment outside the repository"
"$python" -m venv "$work/venv"
# shellcheck disable=SC2086
quiet "$work/venv/bin/python" -m pip install --quiet $torch_spec
quiet "$work/venv/bin/python" -m pip install --quiet "$wheel" nbval ipykernel

echo "== the notebooks alone, in an empty folder"
mkdir "$work/run"
cp "$repo"/notebooks/*.ipynb "$work/run/"
cp "$repo/tests/nbval_sanitize.cfg" "$work/sanitize.cfg"
cd "$work/run"
env -u PYTHONPATH "$work/venv/bin/python" - <<'PY'
import pathlib, sys, hdn
where = pathlib.Path(hdn.__file__).resolve()
assert pathlib.Path(sys.prefix).resolve() in where.parents, f"hdn imported from {where}"
print(f"   hdn {hdn.__version__} from {where.parent}")
PY
echo "== strict nbval: generic CPU kernels, oneDNN SSE4.1, one thread"
env -u PYTHONPATH HDN_LIVE_STEPS=100 ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 OMP_NUM_THREADS=1 \
  MKL_NUM_THREADS=1 "$work/venv/bin/python" -m pytest -q -p no:cacheprovider \
  --nbval --nbval-current-env --nbval-sanitize-with "$work/sanitize.cfg" ./*.ipynb
