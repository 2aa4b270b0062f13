#!/usr/bin/env bash
# Make Fashion-MNIST available for `make demo` / `make test`:
#   1. $SLIMLINE_DATA_DIR or /usr/share/datasets/fashion-mnist already holds it -> nothing to do;
#   2. root on Debian -> apt-get install dataset-fashion-mnist;
#   3. otherwise the loader's checksum-verified download into $SLIMLINE_HOME/data.
set -eu
PY=${1:-.venv/bin/python}
have() { [ -f "$1/train-images-idx3-ubyte.gz" ] || [ -f "$1/train-images-idx3-ubyte" ]; }

if [ -n "${SLIMLINE_DATA_DIR:-}" ] && have "$SLIMLINE_DATA_DIR"; then exit 0; fi
if have /usr/share/datasets/fashion-mnist; then exit 0; fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's dataset-fashion-mnist"
  if apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
     || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; then
    have /usr/share/datasets/fashion-mnist && exit 0
  fi
  echo "apt-get could not install dataset-fashion-mnist; falling back to the download" >&2
fi

exec "$PY" -m worker.datasets fetch
