#!/usr/bin/env bash
# Prepare, on a networked CPU machine, everything an offline GPU machine needs
# to run ds_topkast, into the git-ignored folder .whl/ at the repository root.
#
# The GPU machine (x86-64, CPython 3.12, torch 2.11+cu130, transformers, numpy,
# psutil, py-cpuinfo, ninja, msgpack, einops, tqdm, pyarrow, pandas, ... already
# installed) has no network, no deepspeed, no pydantic, no hjson, no datasets
# and maybe no libaio.  This script puts into .whl/:
#   * cp312 / pure-python wheels of deepspeed's missing requirements
#     (pydantic, pydantic-core, annotated-types, typing-inspection,
#     typing-extensions, hjson) and,
#     unless WITH_DATASETS=0, datasets + dill + multiprocess, pinned to the
#     versions installed in .venv;
#   * with WITH_PEERS=1, the peers bench_headline.py compares with (galore-torch,
#     apollo-torch, bitsandbytes, torchao: `pip install -e '.[bench]'` first, their
#     versions are .venv's; bitsandbytes alone is 43 MB, so pair it with WITH_DATASETS=0,
#     which the headline does not need, to stay under the size limit);
#   * a py3-none-any wheel of deepspeed==0.19.8 built here from the sdist with
#     no op prebuilt (DS_BUILD_OPS=0: the GPU machine JIT-builds its ops);
#   * bookworm's libaio1 and libaio-dev .deb files (for DeepSpeed's async_io).
# On the GPU machine, `source bench/gpu_env.sh` installs and wires them up.
#
# Idempotent: what is already in .whl/ is not fetched or built again; exactly
# one version of each package is kept.
#
# Usage: bash bench/gpu_wheels.sh          (from anywhere)
# Env:   PY=path/to/python   (default: .venv/bin/python; must see torch)
#        WITH_DATASETS=0     (skip datasets/dill/multiprocess)
#        WITH_PEERS=1        (add galore-torch, apollo-torch, bitsandbytes, torchao)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PY:-$ROOT/.venv/bin/python}
WHL=$ROOT/.whl
DS_VERSION=0.19.8
LIMIT_MIB=60
mkdir -p "$WHL"

# Distributions to carry as binary / pure-python wheels (versions = .venv's).
# typing-extensions is on the GPU machine, but pydantic 2.14 needs >= 4.16
# and that machine's version is unknown: carry it too (~45 KB; it shadows the
# GPU machine's copy through PYTHONPATH, and newer releases stay compatible).
PKGS=(pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson)
if [[ ${WITH_DATASETS:-1} != 0 ]]; then
    PKGS+=(datasets dill multiprocess)
fi
if [[ ${WITH_PEERS:-0} == 1 ]]; then
    PKGS+=(galore-torch apollo-torch bitsandbytes torchao)
fi

PLATFORM_ARGS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
               --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
               --platform manylinux1_x86_64)

# Wheel file names use the normalized project name: lower case, runs of
# "-", "_", "." replaced by "_" (pydantic-core -> pydantic_core).
norm() { echo "$1" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/_/g'; }

# Files in .whl/ that are wheels of project $1 (any version), one per line.
wheels_of() {
    local n; n=$(norm "$1")
    find "$WHL" -maxdepth 1 -type f -name '*.whl' -printf '%f\n' |
        while read -r f; do
            [[ $(norm "${f%%-*}") == "$n" ]] && echo "$f"
        done
    return 0
}

# Remove wheels of project $1 whose version is not $2.
drop_other_versions() {
    local f v
    while read -r f; do
        [[ -z $f ]] && continue
        v=${f#*-}; v=${v%%-*}
        if [[ $v != "$2" ]]; then
            echo "  removing stale $f"
            rm -f -- "$WHL/$f"
        fi
    done < <(wheels_of "$1")
}

have_wheel() {  # project version
    local f
    while read -r f; do
        [[ -z $f ]] && continue
        local v=${f#*-}; v=${v%%-*}
        [[ $v == "$2" ]] && return 0
    done < <(wheels_of "$1")
    return 1
}

echo "== wheels from PyPI (cp312, manylinux x86-64 or pure python)"
for p in "${PKGS[@]}"; do
    v=$("$PY" -c 'import sys, importlib.metadata as m; print(m.version(sys.argv[1]))' "$p")
    drop_other_versions "$p" "$v"
    if have_wheel "$p" "$v"; then
        echo "  have $p==$v"
        continue
    fi
    echo "  get  $p==$v"
    "$PY" -m pip download -q --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp "${PLATFORM_ARGS[@]}" \
        -d "$WHL" "$p==$v" 2> >(grep -v 'is neither a file nor a directory' >&2)
    have_wheel "$p" "$v" || { echo "ERROR: no wheel for $p==$v in $WHL" >&2; exit 1; }
done

echo "== deepspeed $DS_VERSION wheel (built here, no ops prebuilt)"
drop_other_versions deepspeed "$DS_VERSION"
if have_wheel deepspeed "$DS_VERSION"; then
    echo "  have deepspeed==$DS_VERSION"
else
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (
        # No op is compiled into the wheel: drop every DS_BUILD_* override,
        # then set DS_BUILD_OPS=0.  DS_ACCELERATOR=cuda records the CUDA op
        # list / accelerator name as the GPU machine will see them.
        for var in $(compgen -e | grep '^DS_BUILD_' || true); do unset "$var"; done
        export DS_BUILD_OPS=0 DS_ACCELERATOR=cuda
        "$PY" -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir \
            --no-binary deepspeed -w "$tmp" "deepspeed==$DS_VERSION"
    ) > "$tmp/build.log" 2>&1 || { cat "$tmp/build.log" >&2; echo "ERROR: deepspeed build failed" >&2; exit 1; }
    built=("$tmp"/deepspeed-"$DS_VERSION"-*.whl)
    [[ -f ${built[0]} ]] || { cat "$tmp/build.log" >&2; echo "ERROR: no deepspeed wheel built" >&2; exit 1; }
    mv -- "${built[0]}" "$WHL/"
    echo "  built $(basename "${built[0]}")"
    rm -rf "$tmp"; trap - EXIT
fi

echo "== libaio .deb files (Debian bookworm, for DeepSpeed async_io)"
for deb in libaio1 libaio-dev; do
    if compgen -G "$WHL/${deb}_*_amd64.deb" > /dev/null; then
        echo "  have $(cd "$WHL" && ls ${deb}_*_amd64.deb)"
    else
        echo "  get  $deb"
        (cd "$WHL" && apt-get download -q "$deb:amd64" 2>&1 | grep -v 'unsandboxed' || true)
        compgen -G "$WHL/${deb}_*_amd64.deb" > /dev/null ||
            { echo "ERROR: apt-get download $deb failed" >&2; exit 1; }
    fi
done
# Exactly one version of each: keep the newest file name if several.
for deb in libaio1 libaio-dev; do
    mapfile -t debs < <(cd "$WHL" && ls ${deb}_*_amd64.deb | sort -V)
    for ((i = 0; i < ${#debs[@]} - 1; i++)); do
        echo "  removing stale ${debs[i]}"; rm -f -- "$WHL/${debs[i]}"
    done
done

echo "== checks"
"$PY" - "$WHL" "$DS_VERSION" <<'EOF'
import ast, glob, os, re, sys, zipfile
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

whl, ds_version = sys.argv[1], sys.argv[2]
# Already on the GPU machine: named in its description, plus the usual
# requirements of torch / transformers / huggingface-hub (filelock, pyyaml,
# typing-extensions, ...), which are there because those are installed.
present = {canonicalize_name(n) for n in """
 torch transformers accelerate numpy psutil py-cpuinfo ninja msgpack
 nvidia-ml-py einops packaging tqdm safetensors tokenizers huggingface-hub
 pyarrow fsspec xxhash pandas requests matplotlib pytest pytest-xdist
 typing-extensions filelock pyyaml setuptools jinja2 networkx sympy regex
 httpx
""".split()}
env = dict(default_environment(), python_version="3.12",
           python_full_version="3.12.3", implementation_name="cpython",
           platform_python_implementation="CPython", sys_platform="linux",
           platform_machine="x86_64", os_name="posix", platform_system="Linux")
ok = True
wheels = sorted(glob.glob(os.path.join(whl, "*.whl")))
carried = {}
for w in wheels:
    name, ver, _, tags = parse_wheel_filename(os.path.basename(w))
    # abi3: a stable-ABI wheel built for CPython 3.N runs on 3.12 for any N <= 12 (torchao's cp310-abi3)
    stable_abi = lambda t: t.abi == "abi3" and re.fullmatch(r"cp3(\d+)", t.interpreter) and int(t.interpreter[3:]) <= 12
    good = any((t.interpreter in ("py3", "py312", "cp312") and t.abi in ("none", "abi3", "cp312") or stable_abi(t)) and
               (t.platform == "any" or
                re.fullmatch(r"manylinux(1|2010|2014|_2_\d+)_x86_64", t.platform))
               for t in tags)
    if not good:
        print(f"  BAD TAGS {os.path.basename(w)}"); ok = False
    if name in carried:
        print(f"  TWO VERSIONS of {name}"); ok = False
    carried[name] = ver
for w in wheels:
    name = parse_wheel_filename(os.path.basename(w))[0]
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        reqs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines()
                if l.startswith("Requires-Dist:")]
        if name == "deepspeed":
            info = z.read("deepspeed/git_version_info_installed.py").decode()
            ops = ast.literal_eval(re.search(r"installed_ops=(\{.*\})", info).group(1))
            acc = re.search(r"accelerator_name='(\w*)'", info).group(1)
            print(f"  deepspeed: accelerator_name={acc}, installed ops: "
                  f"{[k for k, v in ops.items() if v] or 'none'} of {len(ops)}")
            if any(ops.values()):
                ok = False
            if "deepspeed/ops/csrc/aio/py_lib/py_ds_aio.cpp" not in z.namelist():
                print("  deepspeed wheel lacks ops/csrc sources for JIT builds"); ok = False
    for r in map(Requirement, reqs):
        if r.marker and not r.marker.evaluate(dict(env, extra="")):
            continue
        n = canonicalize_name(r.name)
        if n in carried:
            if r.specifier and not r.specifier.contains(carried[n], prereleases=True):
                print(f"  {name}: needs {r}, carried {carried[n]}"); ok = False
        elif n not in present:
            print(f"  {name}: needs {r}, neither carried nor on the GPU machine"); ok = False
        elif r.specifier:
            print(f"  {name}: needs {r} (on the GPU machine; version not checked)")
print("  checks:", "OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
EOF

echo "== .whl/ contents"
(cd "$WHL" && ls -l --block-size=K | tail -n +2 | awk '{printf "  %8s  %s\n", $5, $9}')
bytes=$(du -sb "$WHL" | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "== total size of .whl/: $mib MiB ($bytes bytes)"
if (( bytes >= LIMIT_MIB * 1048576 )); then
    echo "ERROR: .whl/ is over $LIMIT_MIB MiB" >&2
    exit 1
fi
