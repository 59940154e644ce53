#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach PyPI but has Python 3.12 with CUDA PyTorch,
# Lightning, numpy, scipy, pandas, matplotlib, scikit-learn (an image such as the one
# scripts/gpu-check.sh was written for). Downloads, into .whl/, every package of this repo's
# .venv that such an image lacks (the versions pinned here), as cp312 manylinux x86-64 wheels;
# a package published only as source is built into a wheel here. Carry .whl/ to that machine
# and run scripts/gpu-check.sh there: it installs them first.
#   make install && bash scripts/gpu-wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
mkdir -p "$DEST"
# already in the GPU image (its package list), or not wanted there
HAVE=" torch lightning pytorch-lightning lightning-utilities torchmetrics numpy scipy pandas matplotlib scikit-learn
 seaborn statsmodels patsy formulaic interface-meta narwhals pyyaml requests urllib3 idna certifi charset-normalizer
 pillow contourpy cycler fonttools kiwisolver pyparsing python-dateutil six packaging tqdm typing-extensions jinja2
 markupsafe networkx sympy mpmath filelock fsspec joblib threadpoolctl cloudpickle protobuf pyarrow attrs aiohttp
 aiosignal aiohappyeyeballs frozenlist multidict yarl propcache anyio h11 click pygments pytest pluggy iniconfig
 tifffile zipp wrapt werkzeug markdown rich psutil pydantic pydantic-core annotated-types typing-inspection
 py-spy cffi pycparser cryptography "
HAVE=" $(echo $HAVE) "  # one line, each name between spaces
PLAT=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
.venv/bin/python -m pip freeze --exclude-editable | while IFS= read -r line; do
  name=${line%%==*}; key=$(echo "$name" | tr 'A-Z_' 'a-z-')
  case "$HAVE" in *" $key "*) continue ;; esac
  if ! .venv/bin/python -m pip download -q --no-deps --only-binary=:all: "${PLAT[@]}" -d "$DEST" "$line" 2>/dev/null; then
    .venv/bin/python -m pip wheel -q --no-deps -w "$DEST" "$line"  # source only: pure Python, built here
  fi
  echo "  $line"
done
du -sh "$DEST"
