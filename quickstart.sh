#!/usr/bin/env bash
# The README's two commands. Each sets everything up first if that is not done yet:
#
#     bash quickstart.sh train   # train the tiny GPT-2-style model on the embedded corpus into runs/tiny
#     bash quickstart.sh test    # run the test suite
#
# Set-up: a virtual environment .venv made with Python 3.11 or newer (PYTHON=... picks
# one), ds_topkast installed into it with its test requirements and torch 2.13 (the
# CUDA build where pip picks it, the CPU build on CPU-only machines set up that way),
# a C++ compiler for DeepSpeed's JIT-built ops and, for the NVMe dense store's tests,
# libaio (apt-get, when run as root or with password-less sudo). A marker in .venv records the install against setup.py, so a
# second run installs nothing. `train` on a runs/tiny that already holds the run
# continues it (--resume), which does nothing more once it is finished.
set -euo pipefail
cd "$(dirname "$0")"

find_python() {  # the first Python >= 3.11 among $PYTHON, python3, python3.13 ... python3.11
  local candidate
  for candidate in ${PYTHON:-} python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
  echo "quickstart: no Python 3.11 or newer found; install one, or point PYTHON=/path/to/python3.11 at it." >&2
  exit 1
}

set_up_python() {
  local marker=".venv/.ds_topkast-installed-$(sha256sum setup.py | cut -c1-16)"
  if ! { [[ -f .venv/bin/activate ]] && .venv/bin/python -m pip --version >/dev/null 2>&1; }; then
    local python
    python=$(find_python)
    rm -rf .venv  # a half-made one (venv without ensurepip) is made again, not reused
    "$python" -m venv .venv || {
      rm -rf .venv
      echo "quickstart: '$python -m venv' failed; install the venv module (Debian: apt-get install python3-venv)." >&2
      exit 1
    }
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
  if [[ ! -f $marker ]]; then
    python -m pip install -q --upgrade pip
    python -m pip install -q torch==2.13.0 -e ".[lm,test]"
    rm -f .venv/.ds_topkast-installed-*
    touch "$marker"
  fi
}

set_up_system_packages() {  # DeepSpeed JIT-builds its ops with a C++ compiler; its async I/O op needs libaio
  local missing=()
  command -v c++ >/dev/null 2>&1 || missing+=(g++)
  if [[ ${1:-} == libaio ]] && ! dpkg -s libaio-dev >/dev/null 2>&1 &&
     ! { ! command -v dpkg >/dev/null 2>&1 && ldconfig -p 2>/dev/null | grep -q libaio.so; }; then
    missing+=(libaio-dev)
  fi
  [[ ${#missing[@]} == 0 ]] && return
  local sudo=()
  [[ $(id -u) == 0 ]] || sudo=(sudo -n)
  if command -v apt-get >/dev/null 2>&1 && "${sudo[@]}" true 2>/dev/null; then
    "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq "${missing[@]}"
  else
    echo "quickstart: DeepSpeed needs ${missing[*]} here: run 'sudo apt-get install ${missing[*]}' once." >&2
    exit 1
  fi
}

case ${1:-} in
  train)
    set_up_system_packages
    set_up_python
    resume=()
    [[ -f runs/tiny/latest ]] && resume=(--resume)
    bash launch/train_single_node.sh configs/tiny_gpt2.json --out runs/tiny "${resume[@]}"
    ;;
  test)
    set_up_system_packages libaio
    set_up_python
    python -m pytest -q -n 2
    ;;
  *)
    echo "usage: bash quickstart.sh train | test" >&2
    exit 2
    ;;
esac
