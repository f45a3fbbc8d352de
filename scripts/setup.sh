#!/usr/bin/env bash
# Create ./.venv with Python 3.11 and install the project and its pinned requirements, and the authors'
# release into ./.release for the comparison tests.
# Safe to run every time: it reinstalls only when a requirements file or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python=$candidate; break
    fi
  done
fi
if [ -z "$python" ]; then
  echo "error: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2
  exit 2
fi

# DM Control renders headless through OSMesa on machines without a GPU.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! ldconfig -p | grep -q libOSMesa; then
  echo "setup: installing libosmesa6 for headless MuJoCo rendering"
  (apt-get update -qq && apt-get install -y -qq libosmesa6 >/dev/null) || echo "setup: warning: could not install libosmesa6; DM Control pixels need MUJOCO_GL=egl or osmesa"
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.installed
want=$(cat requirements.txt requirements-release.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing requirements into .venv (first run takes a few minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
  # The authors' release, for the side-by-side comparison tests (scripts/compare_release.py).
  rm -rf .release
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --target .release -r requirements-release.txt
  echo "$want" > "$stamp"
fi
