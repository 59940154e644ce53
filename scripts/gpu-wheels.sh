#!/usr/bin/env bash
# What a GPU machine that cannot reach PyPI needs to run scripts/gpu-check.sh, into folders that
# travel with the working tree (both git-ignored; about 55 MB together, under a 64 MiB limit):
#   .whl/                  cp312 manylinux x86-64 wheels of every package of this repo's .venv that
#                          such an image lacks (the versions pinned here). The image is assumed to
#                          have Python 3.12 with CUDA PyTorch, Lightning, numpy, scipy, pandas,
#                          matplotlib, scikit-learn and pytest (HAVE below). MLflow travels as
#                          mlflow-skinny (the client and the sqlite store; mlflow's own 12 MB wheel
#                          is its web UI); server-only and PostgreSQL packages stay behind.
#   data/fashion-mnist/    the four Fashion-MNIST IDX files (30 MB), from the apt package
#                          (`make data`); gpu-check.sh installs them where freqexp looks.
#   make install && bash scripts/gpu-wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
mkdir -p "$DEST"
# already in the GPU image (its package list)
HAVE=" torch lightning pytorch-lightning lightning-utilities torchmetrics numpy scipy pandas matplotlib scikit-learn
 seaborn statsmodels patsy formulaic interface-meta narwhals pyyaml requests urllib3 idna certifi charset-normalizer
 pillow contourpy cycler fonttools kiwisolver pyparsing python-dateutil six packaging tqdm typing-extensions jinja2
 markupsafe networkx sympy mpmath filelock fsspec joblib threadpoolctl cloudpickle protobuf pyarrow attrs aiohttp
 aiosignal aiohappyeyeballs frozenlist multidict yarl propcache anyio h11 click pygments pytest pluggy iniconfig
 tifffile zipp wrapt werkzeug markdown rich psutil py-spy tabulate "
# not wanted on a GPU check: the UI bundle (mlflow-skinny carries the client), the tracking server
# and its web stack, PostgreSQL drivers, SLURM submission; transformers and its stack (about 20 MB, which
# the 64 MiB limit does not leave): the CLIP models' CUDA tests skip without it
SKIP=" mlflow flask flask-cors gunicorn graphene graphql-core graphql-relay docker huey itsdangerous blinker psycopg
 psycopg-binary submitit hydra-submitit-launcher google-auth pyasn1 pyasn1-modules transformers tokenizers safetensors
 regex huggingface-hub hf-xet kernels typer shellingham httpx2 httpcore2 truststore tomlkit markdown-it-py mdurl "
HAVE=" $(echo $HAVE $SKIP) "  # one line, each name between spaces
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
mkdir -p data/fashion-mnist
cp -u /usr/share/datasets/fashion-mnist/*-ubyte.gz data/fashion-mnist/ 2>/dev/null \
  || echo "gpu-wheels: Fashion-MNIST not found in /usr/share/datasets/fashion-mnist (make data); the GPU check will use none" >&2
du -sh "$DEST" data/fashion-mnist 2>/dev/null
