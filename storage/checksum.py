"""CRC-32C (Castagnoli) for NVLog records, callable from numba kernels.

Every NVLog record carries a crc32c over its header and payload, and the partner checks
every one of them during takeover replay, so the checksum bounds replay speed. Three
implementations live here, all giving the values of ``google_crc32c.value``:

* ``crc32c_kernel_sse42``: the CPU's ``crc32`` instruction (SSE4.2) reached from numba
  through an LLVM intrinsic, three independent streams interleaved so the instruction's
  3-cycle latency does not bound throughput; the streams are merged with precomputed
  "shift by n zero bytes" tables.
* ``crc32c_kernel_table``: slicing-by-8 tables, for CPUs without SSE4.2 (and as a
  cross-check of the fast path in tests).
* ``crc32c_py``: a pure-Python reference with no numba at all.

``crc32c_kernel`` is whichever of the first two this CPU can run, chosen at import.

All kernels take a *finished* crc (0 for a fresh one) and return a finished crc, so a
record's checksum can be computed piecewise:
``crc32c(a + b) == crc32c_kernel(b, 0, len(b), crc32c(a))``.
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import config
from numba.extending import intrinsic

__all__ = [
    "HAVE_SSE42",
    "crc32c",
    "crc32c_kernel",
    "crc32c_kernel_sse42",
    "crc32c_kernel_table",
    "crc32c_py",
]

POLY = 0x82F63B78  # reflected Castagnoli polynomial
_MASK32 = 0xFFFFFFFF


# --------------------------------------------------------------------------- tables


def _byte_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE_PY: list[int] = _byte_table()


def _slicing_tables() -> np.ndarray:
    # Stored as int64 so the kernels never mix uint32 with int64 (numba would widen to
    # float64 for uint64/int64 mixes, and int64 keeps all the arithmetic in one type).
    t = np.zeros((8, 256), dtype=np.int64)
    t[0] = _TABLE_PY
    for k in range(1, 8):
        t[k] = (t[k - 1] >> 8) ^ t[0][t[k - 1] & 0xFF]
    return t


_SLICE8 = _slicing_tables()


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the polynomial, in the reflected bit order (bit 31 is x^0)."""
    m = 1 << 31
    p = 0
    while m:
        if a & m:
            p ^= b
        b = (b >> 1) ^ POLY if b & 1 else b >> 1
        m >>= 1
    return p


def _x8n(n: int) -> int:
    """x^(8n) modulo the polynomial: the operator that feeds n zero bytes."""
    result = 1 << 31  # x^0
    square = 1 << 30  # x^1
    e = 8 * n
    while e:
        if e & 1:
            result = _multmodp(square, result)
        square = _multmodp(square, square)
        e >>= 1
    return result


def _shift_tables(n: int) -> np.ndarray:
    """Byte-wise lookup tables for "advance a raw crc register over n zero bytes".

    The operation is linear over GF(2), so it is the xor of one column per set bit; the
    tables precombine the columns eight bits at a time (4 lookups per shift).
    """
    xp = _x8n(n)
    cols = [_multmodp(xp, 1 << j) for j in range(32)]
    t = np.zeros((4, 256), dtype=np.int64)
    for k in range(4):
        row = [0] * 256
        for v in range(1, 256):
            low = (v & -v).bit_length() - 1
            row[v] = row[v & (v - 1)] ^ cols[8 * k + low]
        t[k] = row
    return t


# Interleaving block: each stream folds _BLK bytes, then the three are merged (8 table
# lookups). 256 was fastest here for both 64 MiB buffers and 4 KiB records: LLVM fully
# unrolls the 32-step inner loop, while 512..4096 ran at half speed (not unrolled) and
# only 16 KiB+ blocks came close again. A small block also keeps a 4 KiB record ~93%
# three streams wide.
_BLK = 256
_SHIFT = _shift_tables(_BLK)


# --------------------------------------------------------------------------- CPU check


def _detect_sse42() -> bool:
    """True if the code numba generates here may use the SSE4.2 crc32 instruction.

    What matters is the target numba compiles for, not only the silicon: with
    NUMBA_CPU_NAME set (portable caches), only the features it is told count. (No
    environment switch to force the table path: numba's cache key does not include
    which crc kernel a caller was compiled against, so processes could mix them.)
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if config.CPU_NAME and config.CPU_NAME != "host":
        return "+sse4.2" in (config.CPU_FEATURES or "")
    try:
        from llvmlite import binding

        return bool(binding.get_host_cpu_features().get("sse4.2", False))
    except Exception:  # feature query unsupported: fall back to the kernel's flags
        try:
            with open("/proc/cpuinfo") as f:
                return any(line.startswith("flags") and " sse4_2" in line for line in f)
        except OSError:
            return False


HAVE_SSE42: bool = _detect_sse42()


# --------------------------------------------------------------------------- intrinsics


@intrinsic
def _load_u64(typingctx, buf, idx):  # type: ignore[no-untyped-def]
    """Unaligned native-endian 8-byte load from a 1-D uint8 array (read-only allowed).

    numba has no cheap typed view of an arbitrary byte offset of a read-only array, and
    assembling 8 separate byte loads is not reliably merged by LLVM.
    """
    if not (isinstance(buf, types.Array) and buf.ndim == 1 and buf.dtype == types.uint8):
        return None
    sig = types.int64(buf, types.intp)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        i64 = ir.IntType(64)
        return builder.load(builder.bitcast(ptr, i64.as_pointer()), align=1)

    return sig, codegen


@intrinsic
def _crc_u64(typingctx, crc, data):  # type: ignore[no-untyped-def]
    """One SSE4.2 crc32 step over 8 bytes (raw register in, raw register out)."""
    sig = types.int64(types.int64, types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(i64, [i64, i64])
        fn = builder.module.declare_intrinsic("llvm.x86.sse42.crc32.64.64", fnty=fnty)
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def _crc_u8(typingctx, crc, data):  # type: ignore[no-untyped-def]
    """One SSE4.2 crc32 step over one byte, for the tail."""
    sig = types.int64(types.int64, types.uint8)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i32, i8 = ir.IntType(32), ir.IntType(8)
        fnty = ir.FunctionType(i32, [i32, i8])
        fn = builder.module.declare_intrinsic("llvm.x86.sse42.crc32.32.8", fnty=fnty)
        c32 = builder.trunc(args[0], i32)
        return builder.zext(builder.call(fn, [c32, args[1]]), ir.IntType(64))

    return sig, codegen


# --------------------------------------------------------------------------- kernels


@njit(cache=True, nogil=True)
def _check_bounds(buf, start, end):  # type: ignore[no-untyped-def]
    # An out-of-range request would read past the buffer (numba does not bounds-check).
    if start < 0 or end < start or end > buf.size:
        raise ValueError("crc32c: need 0 <= start <= end <= buf.size")


@njit(cache=True, nogil=True)
def _shift(c, tbl):  # type: ignore[no-untyped-def]
    return (
        tbl[0, c & 0xFF]
        ^ tbl[1, (c >> 8) & 0xFF]
        ^ tbl[2, (c >> 16) & 0xFF]
        ^ tbl[3, (c >> 24) & 0xFF]
    )


@njit(cache=True, nogil=True)
def _crc3(buf, i, end, c, blk, tbl):  # type: ignore[no-untyped-def]
    """Fold as many 3*blk chunks as fit in [i, end), three independent streams each.

    Three streams because crc32 has a 3-cycle latency but issues one per cycle.
    """
    while end - i >= 3 * blk:
        c1 = np.int64(0)
        c2 = np.int64(0)
        j = i
        stop = i + blk
        while j < stop:
            c = _crc_u64(c, _load_u64(buf, j))
            c1 = _crc_u64(c1, _load_u64(buf, j + blk))
            c2 = _crc_u64(c2, _load_u64(buf, j + 2 * blk))
            j += 8
        # Register after A||B == shift(reg(A), |B|) ^ reg(B from 0): the crc is linear.
        c = _shift(c, tbl) ^ c1
        c = _shift(c, tbl) ^ c2
        i += 3 * blk
    return i, c


@njit(cache=True, nogil=True)
def crc32c_kernel_sse42(buf, start, end, crc):  # type: ignore[no-untyped-def]
    """crc32c of buf[start:end] continuing from finished crc `crc`, via SSE4.2.

    Only call where ``HAVE_SSE42``: without the instruction LLVM cannot compile it.
    """
    _check_bounds(buf, start, end)
    c = (np.int64(crc) & 0xFFFFFFFF) ^ 0xFFFFFFFF
    i = np.int64(start)
    end = np.int64(end)
    i, c = _crc3(buf, i, end, c, _BLK, _SHIFT)
    while i + 8 <= end:
        c = _crc_u64(c, _load_u64(buf, i))
        i += 8
    while i < end:
        c = _crc_u8(c, buf[i])
        i += 1
    return np.uint32(c ^ 0xFFFFFFFF)


@njit(cache=True, nogil=True)
def crc32c_kernel_table(buf, start, end, crc):  # type: ignore[no-untyped-def]
    """crc32c of buf[start:end] continuing from finished crc `crc`, slicing-by-8.

    Portable: byte loads only, so endianness and alignment do not matter.
    """
    _check_bounds(buf, start, end)
    t = _SLICE8
    c = (np.int64(crc) & 0xFFFFFFFF) ^ 0xFFFFFFFF
    i = np.int64(start)
    end = np.int64(end)
    while i + 8 <= end:
        a = c ^ (
            np.int64(buf[i])
            | (np.int64(buf[i + 1]) << 8)
            | (np.int64(buf[i + 2]) << 16)
            | (np.int64(buf[i + 3]) << 24)
        )
        c = (
            t[7, a & 0xFF]
            ^ t[6, (a >> 8) & 0xFF]
            ^ t[5, (a >> 16) & 0xFF]
            ^ t[4, (a >> 24) & 0xFF]
            ^ t[3, buf[i + 4]]
            ^ t[2, buf[i + 5]]
            ^ t[1, buf[i + 6]]
            ^ t[0, buf[i + 7]]
        )
        i += 8
    while i < end:
        c = (c >> 8) ^ t[0, (c ^ buf[i]) & 0xFF]
        i += 1
    return np.uint32(c ^ 0xFFFFFFFF)


# Chosen once per process; kernels elsewhere (replay.py) bind to this dispatcher when
# they compile, and numba keys their cache on the CPU, so a cache built on an SSE4.2
# host is not loaded on one without it.
crc32c_kernel = crc32c_kernel_sse42 if HAVE_SSE42 else crc32c_kernel_table


# --------------------------------------------------------------------------- Python API


def _as_u8(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    if isinstance(data, np.ndarray):
        if data.dtype == np.uint8 and data.ndim == 1 and data.flags.c_contiguous:
            return data
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)  # zero copy, read-only for bytes
    except (ValueError, TypeError, BufferError):  # e.g. a non-contiguous memoryview
        return np.frombuffer(bytes(data), dtype=np.uint8)


def crc32c(data: bytes | bytearray | memoryview | np.ndarray, crc: int = 0) -> int:
    """crc32c of a whole buffer (continuing from `crc`), as a Python int."""
    buf = _as_u8(data)
    return int(crc32c_kernel(buf, 0, buf.size, crc))


def crc32c_py(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Pure-Python crc32c, byte at a time: the reference the kernels are tested against."""
    table = _TABLE_PY
    c = (crc & _MASK32) ^ _MASK32
    for b in bytes(data):
        c = (c >> 8) ^ table[(c ^ b) & 0xFF]
    return c ^ _MASK32
