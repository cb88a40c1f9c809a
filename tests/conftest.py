"""Single-process DeepSpeed on the CPU accelerator for every in-process test.

Multi-rank behaviour is tested by starting real ranks with the deepspeed launcher;
the in-process tests run as rank 0 of a world of 1 (gloo), set up before DeepSpeed
is first imported so its accelerator detection sees DS_ACCELERATOR=cpu.
"""
import os
import socket
import tempfile


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def core_share(processes: int) -> str:
    """OpenMP threads for one of `processes` processes sharing this machine's cores.

    Processes that each spin a thread per core wait on one another: two CPU ranks on two
    cores trained 4.6x slower with torch's default than with one thread each.
    """
    return str(max(1, (os.cpu_count() or 1) // processes))


os.environ.setdefault("DS_ACCELERATOR", "cpu")
if os.environ["DS_ACCELERATOR"] == "cpu":
    # test_kernels.py runs the Triton kernels in Triton's interpreter. The variable must be set before triton is
    # first imported: triton.language's own jitted helpers (tl.cumsum, ...) are made interpreted or not right then.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_TOPKAST_CACHE", tempfile.mkdtemp(prefix="ds_topkast_corpora_"))  # prepared corpora
if "PYTEST_XDIST_WORKER" in os.environ:  # each pytest-xdist worker is its own world of one, on its own port
    os.environ["MASTER_PORT"] = _free_port()
    os.environ.setdefault("OMP_NUM_THREADS", core_share(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))))
for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": _free_port(), "RANK": "0", "LOCAL_RANK": "0",
                   "WORLD_SIZE": "1", "LOCAL_SIZE": "1"}.items():
    os.environ.setdefault(key, value)


def pytest_sessionfinish(session, exitstatus):
    """Delete the shared-memory buffer DeepSpeed's CPU comm op made for this process's port (see launcher.py)."""
    from launcher import remove_shm_buffers

    remove_shm_buffers(os.environ["MASTER_PORT"])
