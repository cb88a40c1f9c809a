# shellcheck shell=bash
# Source this file with bash ON THE GPU MACHINE, from the repository root:
#
#     source bench/gpu_env.sh || exit 1
#
# It uses what bench/gpu_wheels.sh put into .whl/ (no network needed):
#   1. installs the carried wheels (deepspeed, pydantic, hjson, datasets, ...)
#      into /tmp/site with the machine's python3 and puts /tmp/site and the
#      repository root first on PYTHONPATH (and /tmp/site/bin on PATH);
#   2. unpacks the libaio1 / libaio-dev .debs into /tmp/aio (never into /)
#      and points the compiler, linker and loader at them, for DeepSpeed's
#      async_io op (NVMe store);
#   3. exports DS_ACCELERATOR=cuda, TORCH_CUDA_ARCH_LIST=9.0 (always; H100/H200:
#      short JIT builds) and TORCH_EXTENSIONS_DIR=/tmp/torch_extensions.
# Sourcing it twice is cheap: nothing is reinstalled or unpacked again and no
# path is added twice.  Overrides: GPU_PYTHON (python3), GPU_SITE (/tmp/site),
# GPU_AIO (/tmp/aio), and any of the exported variables set beforehand.
#
# How DeepSpeed finds libaio (deepspeed/ops/op_builder/async_io.py, builder.py):
#   * AsyncIOBuilder.is_compatible() -> OpBuilder.has_function('io_submit',
#     ('aio',)) compiles and links a tiny C program with distutils' compiler;
#     it passes $CFLAGS (compile) and $LDFLAGS (link) as extra arguments, so
#     -I/tmp/aio/usr/include and -L/tmp/aio/usr/lib/x86_64-linux-gnu there
#     make the probe pass.  (check_for_libaio_pkg() only runs `dpkg -l
#     libaio-dev` to print an install hint when the probe fails; it decides
#     nothing.)
#   * The JIT build, torch.utils.cpp_extension.load(), ignores CFLAGS and
#     LDFLAGS; it runs c++ with extra_ldflags ['-L$CUDA_HOME', ...,
#     '-laio', '-lcuda', '-lcudart'].  gcc itself reads CPATH (header search
#     for C and C++, ahead of the system include dirs) and LIBRARY_PATH (-l
#     search at link time, after gcc's own system lib dirs: a system
#     libaio.so, if any, wins there, which is harmless), so these two make
#     libaio.h and libaio.so visible to the JIT build.
#   * Loading the built async_io .so needs libaio.so.1 at run time:
#     LD_LIBRARY_PATH (read by the loader when a process starts, which is why
#     it is exported here, before python starts).

_gpu_env_prepend() {  # VAR DIR SEP: put DIR first in $VAR unless already there
    local cur=${!1-}
    case "$3$cur$3" in
        *"$3$2$3"*) ;;
        *) export "$1=$2${cur:+$3$cur}" ;;
    esac
}

_gpu_env_main() {
    local root py site aio whl lib inc stamp d w
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || return 1
    py=${GPU_PYTHON:-python3}
    site=${GPU_SITE:-/tmp/site}
    aio=${GPU_AIO:-/tmp/aio}
    whl=$root/.whl
    if ! compgen -G "$whl/deepspeed-*.whl" > /dev/null; then
        echo "gpu_env: no $whl/deepspeed-*.whl (run bench/gpu_wheels.sh on a networked machine)" >&2
        return 1
    fi

    # 1. Python packages.  The stamp (names and sizes of the wheels) makes a
    #    second sourcing skip the install.
    stamp=$(cd "$whl" && stat -c '%n %s' -- *.whl | md5sum | cut -d' ' -f1)
    if [[ ! -f $site/.gpu_env_stamp || $(cat "$site/.gpu_env_stamp") != "$stamp" ]]; then
        if "$py" -m pip --version > /dev/null 2>&1; then
            "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --upgrade --target "$site" "$whl"/*.whl || return 1
        else  # no pip in this python: a wheel is a zip file
            mkdir -p "$site" || return 1
            for w in "$whl"/*.whl; do
                "$py" -m zipfile -e "$w" "$site" || return 1
            done
        fi
        echo "$stamp" > "$site/.gpu_env_stamp"
    fi
    _gpu_env_prepend PYTHONPATH "$root" :
    _gpu_env_prepend PYTHONPATH "$site" :
    [[ -d $site/bin ]] && _gpu_env_prepend PATH "$site/bin" :

    # 2. libaio, unpacked next to nothing else of the system.
    inc=$aio/usr/include
    lib=$aio/usr/lib/x86_64-linux-gnu
    if [[ ! -f $inc/libaio.h || ! -e $lib/libaio.so || ! -e $lib/libaio.so.1 ]]; then
        mkdir -p "$aio" || return 1
        for d in "$whl"/libaio1_*_amd64.deb "$whl"/libaio-dev_*_amd64.deb; do
            [[ -f $d ]] || { echo "gpu_env: missing $d" >&2; return 1; }
            if command -v dpkg > /dev/null 2>&1; then
                dpkg -x "$d" "$aio" || return 1
            else  # no dpkg: a .deb is an ar archive holding data.tar.*
                "$py" - "$d" "$aio" <<'EOF' || return 1
import io, sys, tarfile
deb, dest = sys.argv[1:]
data = open(deb, "rb").read()
assert data[:8] == b"!<arch>\n", deb + " is not a .deb"
pos = 8
while pos + 60 <= len(data):
    name = data[pos:pos + 16].decode().strip().rstrip("/")
    size = int(data[pos + 48:pos + 58])
    if name.startswith("data.tar"):
        with tarfile.open(fileobj=io.BytesIO(data[pos + 60:pos + 60 + size])) as t:
            kw = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
            t.extractall(dest, **kw)
        break
    pos += 60 + size + (size & 1)
else:
    sys.exit("no data.tar member in " + deb)
EOF
            fi
        done
    fi
    # -e follows the symlinks: libaio.so -> libaio.so.1.0.2 <- libaio.so.1
    if [[ ! -f $inc/libaio.h || ! -e $lib/libaio.so || ! -e $lib/libaio.so.1 ]]; then
        echo "gpu_env: libaio not usable under $aio" >&2
        return 1
    fi
    _gpu_env_prepend CPATH "$inc" :
    _gpu_env_prepend LIBRARY_PATH "$lib" :
    _gpu_env_prepend LD_LIBRARY_PATH "$lib" :
    _gpu_env_prepend CFLAGS "-I$inc" ' '
    _gpu_env_prepend LDFLAGS "-L$lib" ' '

    # 3. DeepSpeed / torch JIT settings.
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cuda}
    # Always 9.0: the GPU image sets "9.0a", which DeepSpeed 0.19.8's op builder cannot
    # parse (int('0a') in compute_capability_args), so every JIT build would fail.
    export TORCH_CUDA_ARCH_LIST=9.0
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}

    # One line of facts for the log; a missing nvcc is only a warning here.
    local nvcc=${CUDA_HOME:+$CUDA_HOME/bin/nvcc}
    [[ -n $nvcc && -x $nvcc ]] || nvcc=$(command -v nvcc 2> /dev/null || true)
    [[ -n $nvcc ]] || { [[ -x /usr/local/cuda/bin/nvcc ]] && nvcc=/usr/local/cuda/bin/nvcc; }
    echo "gpu_env: python=$(command -v "$py") site=$site aio=$aio" \
        "nvcc=${nvcc:-NONE} arch=$TORCH_CUDA_ARCH_LIST" \
        "wheels=$(cd "$whl" && ls -- *.whl | sed 's/-py.*\|-cp.*//' | tr '\n' ' ')"
    [[ -n $nvcc ]] || echo "gpu_env: WARNING no nvcc found: DeepSpeed cannot JIT-build CUDA ops" >&2
    return 0
}

_gpu_env_main
# $? is expanded before eval runs: drop the helpers, return main's status.
eval "unset -f _gpu_env_main _gpu_env_prepend; return $?"
