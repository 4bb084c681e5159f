"""The C++ attention kernels for the CPU (`csrc/*.cpp`): built into one shared library for this CPU
and loaded with ctypes.

`build()` compiles every source with g++ (or $CXX) -O3 -march=native -fopenmp, at `make install` or
on first use, into `__pycache__/` beside this file (the user's cache dir where that is not writable), under
a name keyed by the sources, the flags and the CPU's feature flags, so a checkout shared by
machines of different CPUs builds one library each. The library links the OpenMP runtime torch
loaded (libgomp.so.1), so its loops run on torch's thread pool. Without a compiler the callers fall
back: prefill to torch's SDPA (`cpu_prefill`), decode to the Numba loop (`attention`).

Kernels: `flash_prefill_f32` (cpu_prefill.py) and `paged_decode_f32` (attention.py's "cpp"); both
fp32, head_dim in HEAD_DIMS, at most MAX_GROUP query heads per KV head. "auto" takes them only on
CPUs with AVX-512 (`preferred()`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # noqa: F401  (loads libgomp.so.1 before the library needs it)

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(sorted(CSRC.glob("*.cpp")))
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC")
HEAD_DIMS = (64, 128)
MAX_GROUP = 8  # query heads per KV head the kernels are instantiated for
FAST_VECTOR_BITS = 512  # see preferred()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return os.uname().machine


def library_path() -> Path:
    """Where the library for these sources, these flags and this CPU lives (built or not)."""
    h = hashlib.sha256(" ".join(FLAGS).encode() + _cpu_flags().encode())
    for src in sorted(CSRC.glob("*.[ch]*")):
        h.update(src.name.encode() + src.read_bytes())
    name = f"orbitflow_cpu_kernels-{h.hexdigest()[:16]}.so"
    here = CSRC.parent / "__pycache__"
    try:
        here.mkdir(exist_ok=True)
        if os.access(here, os.W_OK):
            return here / name
    except OSError:
        pass
    # not a shared temp dir: a name anyone can compute there is a library anyone could plant
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "orbitflow" / "kernels" / name


def build() -> Path:
    """Compile the kernels into one library unless built; its path. Raises RuntimeError saying why not
    (no C++ compiler, or its error output). Safe to race: each build writes a private file and
    renames it into place."""
    path = library_path()
    if path.exists():
        return path
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) to build the CPU attention kernels")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"building {CSRC} with {cxx} failed:\n{done.stderr[-2000:]}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o755 & ~umask)  # mkstemp made it 0600: others running the checkout load it too
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded library, built if needed; None (logged once) where it cannot be built or loaded."""
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as e:
        log.warning("the C++ CPU attention kernels are not available (prefill takes torch's SDPA, decode "
                    "Numba's loop): %s", e)
        return None
    P, L, I, F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
    lib.flash_prefill_f32.argtypes = [P, P, P, P, I, I, I, I, I, L, L, L, L, L, L, F, I]
    lib.paged_decode_f32.argtypes = [P, P, P, P, P, P, P, I, I, I, I, L, I, L, L, F, I]
    lib.flash_prefill_f32.restype = lib.paged_decode_f32.restype = lib.orbitflow_vector_bits.restype = I
    return lib


def vector_bits() -> int:
    """The vector width the library was compiled for (512: AVX-512, 256: AVX2, 0: other); 0 unbuilt."""
    lib = library()
    return 0 if lib is None else lib.orbitflow_vector_bits()


@functools.cache
def preferred() -> bool:
    """Whether "auto" takes the C++ kernels here: built, and for 512-bit vectors. The kernels keep
    16 fp32 lanes (one AVX-512 register) per vector; built for AVX2 (-march=haswell on the Zen 5 box)
    they ran 10-14x slower than torch's SDPA in prefill and ~5x slower than the AVX-512 build in
    decode (the register blocks spill), so on such CPUs "auto" takes SDPA and Numba, and the C++
    kernels run only when asked for (impl="cpp", as the tests do)."""
    bits = vector_bits()
    if library() is not None and bits < FAST_VECTOR_BITS:
        log.info("the C++ CPU attention kernels are built for %d-bit vectors: prefill takes torch's SDPA "
                 "and decode Numba's loop unless impl='cpp' is asked for", bits)
    return bits >= FAST_VECTOR_BITS


def paged_decode(q: torch.Tensor, pool: torch.Tensor, table: torch.Tensor, lens: torch.Tensor, scale: float,
                 rows: torch.Tensor | None) -> torch.Tensor | None:
    """attention.paged_decode_attention's contract on CPU tensors (checked by the caller), by
    `csrc/paged_decode.cpp`; None where the library is missing or not built for this shape (the
    caller takes another implementation). The kernel checks each row as it walks it: see
    `attention.raise_for_bad_tasks`."""
    r, h, d = q.shape
    hkv = pool.shape[2]
    if pool.device.type != "cpu" or pool.dtype != torch.float32 or d not in HEAD_DIMS or h // hkv > MAX_GROUP:
        return None
    lib = library()
    if lib is None:
        return None
    from orbitflow_kernels.attention import raise_for_bad_tasks
    qf = q.detach().to(torch.float32).contiguous()
    pool, table = pool.detach().contiguous(), table.to(torch.int64).contiguous()
    lens = lens.to(torch.int64).contiguous()
    rows = None if rows is None else rows.to(torch.int64).contiguous()
    out = torch.empty(qf.shape, dtype=torch.float32)
    bad = torch.zeros(r * hkv, dtype=torch.uint8)
    rc = lib.paged_decode_f32(qf.data_ptr(), pool.data_ptr(), table.data_ptr(), None if rows is None else rows.data_ptr(),
                              lens.data_ptr(), out.data_ptr(), bad.data_ptr(), r, h, hkv, d, pool.shape[0],
                              pool.shape[3], table.shape[0], table.shape[1], scale, torch.get_num_threads())
    if rc:
        return None
    raise_for_bad_tasks(bad.numpy(), lens, rows, table, pool)
    return out.to(q.dtype)


def available() -> bool:
    """True when the library builds and loads here (builds it if needed)."""
    return library() is not None
