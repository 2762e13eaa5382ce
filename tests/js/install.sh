#!/usr/bin/env bash
# Installs what the browser and Node.js tests need: Debian's chromium (apt-get, as root, when it is missing) and
# onnxruntime-web and onnxruntime-node from npm into tests/js/node_modules (onnxruntime-node's optional CUDA download
# is skipped: its CPU binaries come in the package). A step that cannot run is reported here; the tests then say so
# too: skipped with the reason, or failed when CI is set (tests/js_support.py).
set -u
cd "$(dirname "$0")"
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ||
      echo "tests/js/install.sh: apt-get could not install chromium: the browser tests cannot run" >&2
  else
    echo "tests/js/install.sh: no chromium, and no apt-get as root to install it: the browser tests cannot run" \
         "(Debian: sudo apt-get install chromium)" >&2
  fi
fi
if command -v npm >/dev/null 2>&1; then
  npm install --no-audit --no-fund --no-package-lock --loglevel=error --onnxruntime-node-install=skip >/dev/null ||
    echo "tests/js/install.sh: npm install failed: the browser and Node.js tests cannot run" >&2
else
  echo "tests/js/install.sh: no npm: the browser and Node.js tests cannot run (install Node.js and npm)" >&2
fi
exit 0
