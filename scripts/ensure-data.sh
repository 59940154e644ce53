#!/usr/bin/env bash
# Makes sure Fashion-MNIST's four IDX files are where freqexp looks for them.
# As root: installs Debian's dataset-fashion-mnist. Otherwise: says how, in one line.
set -u
SYS=/usr/share/datasets/fashion-mnist
have() { for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
           [ -f "$1/$f.gz" ] || [ -f "$1/$f" ] || return 1; done; }
if have "$SYS" || have data/fashion-mnist; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "freqexp: installing Fashion-MNIST (apt-get install -y dataset-fashion-mnist)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null && have "$SYS" && exit 0
  echo "freqexp: apt-get could not install dataset-fashion-mnist; put the four IDX files in data/fashion-mnist or pass dataset.root=DIR" >&2
  exit 1
fi
echo "freqexp: Fashion-MNIST is missing: run 'sudo apt-get install -y dataset-fashion-mnist', or put the four IDX .gz files in data/fashion-mnist (or pass dataset.root=DIR)" >&2
exit 0  # not fatal: synthetic data and the tests that need no files still work
