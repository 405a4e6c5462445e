#!/usr/bin/env bash
# Prepares the GPU check (benchmarks/gpu_check.sh), from the project's root on the CPU
# machine. A GPU machine here reaches no package index, so .gpu/ (ignored by git) takes
# everything along: the check script, the Fashion-MNIST IDX files, and the pure-Python
# wheels that a bare machine with Python 3.12 and jax[cuda] may lack, at the pins that
# requirements.txt gives Python 3.12. Then, on the GPU machine, from the project's root:
#   bash .gpu/check.sh        (figures under $OUT, default /tmp/gpu_out)
# `bash benchmarks/gpu_prepare.sh --list` prints the wheels it would fetch and stops.
set -euo pipefail
cd "$(dirname "$0")/.."

# The requirements.txt pin of a package for Python 3.12: the line marked for
# Python >= 3.12 if there is one, else the unmarked line; the marker is dropped.
pin312() {
  local lines
  lines=$(grep -E "^$1==" requirements.txt | grep -v 'python_version < "3.12"' || true)
  if [ -z "$lines" ]; then
    echo "requirements.txt has no pin of $1 for Python 3.12" >&2
    exit 1
  fi
  echo "$lines" | head -n 1 | cut -d ';' -f 1 | tr -d ' '
}
want=("$(pin312 flax)" "$(pin312 optax)" "$(pin312 orbax-checkpoint)" "$(pin312 etils)"
      "$(pin312 ml-collections)" "$(pin312 tensorflow-datasets)" "$(pin312 array-record)"
      "$(pin312 numba)" "$(pin312 llvmlite)"
      dm-tree immutabledict simple-parsing docstring-parser tensorflow-metadata
      googleapis-common-protos termcolor toml importlib-resources protobuf)
if [ "${1:-}" = "--list" ]; then
  printf '%s\n' "${want[@]}"
  exit 0
fi

grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
mkdir -p .gpu/whl .gpu/fm
cp benchmarks/gpu_check.sh .gpu/check.sh
cp /usr/share/datasets/fashion-mnist/*.gz .gpu/fm/
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for requirement in "${want[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .gpu/whl "$requirement"
done
# promise has no wheel on the index: build one (pure Python).
python3 -m pip wheel -q --no-deps -w .gpu/whl promise
du -sh .gpu
