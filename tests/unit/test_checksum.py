"""crc32c kernels against google-crc32c: both the SSE4.2 and the table path."""

from __future__ import annotations

import mmap

import google_crc32c
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import checksum
from storage.checksum import (
    HAVE_SSE42,
    crc32c,
    crc32c_kernel,
    crc32c_kernel_sse42,
    crc32c_kernel_table,
    crc32c_py,
)

CHECK = 0xE3069283  # crc32c(b"123456789"), RFC 3720 / iSCSI

KERNELS = [
    pytest.param(crc32c_kernel_table, id="table"),
    pytest.param(
        crc32c_kernel_sse42,
        id="sse42",
        marks=pytest.mark.skipif(not HAVE_SSE42, reason="CPU/target without SSE4.2"),
    ),
]

# Around the kernel's seams: 8-byte words, the 3 x 256-byte interleaved chunk.
LENGTHS = [*range(18), 31, 63, 64, 65, 255, 256, 257, 767, 768, 769, 775, 1535, 1536, 1543]
LENGTHS += [4152, 10007]


def test_check_value() -> None:
    assert crc32c(b"123456789") == CHECK
    assert crc32c_py(b"123456789") == CHECK
    assert google_crc32c.value(b"123456789") == CHECK


def test_selected_kernel_matches_cpu() -> None:
    assert crc32c_kernel is (crc32c_kernel_sse42 if HAVE_SSE42 else crc32c_kernel_table)


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_agrees_with_google(kernel) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(7)
    buf = rng.integers(0, 256, max(LENGTHS) + 16, dtype=np.uint8)
    for n in LENGTHS:
        for start in range(9):  # every alignment of the first 8-byte load
            want = google_crc32c.value(buf[start : start + n].tobytes())
            assert kernel(buf, start, start + n, 0) == want, (n, start)


@pytest.mark.parametrize("kernel", KERNELS)
@settings(max_examples=50, deadline=None)
@given(a=st.binary(max_size=2000), b=st.binary(max_size=2000))
def test_continuation(kernel, a: bytes, b: bytes) -> None:  # type: ignore[no-untyped-def]
    first = int(kernel(np.frombuffer(a, np.uint8), 0, len(a), 0))
    buf = np.frombuffer(b, np.uint8)
    assert kernel(buf, 0, len(b), first) == google_crc32c.value(a + b)
    assert crc32c_py(b, crc32c_py(a)) == google_crc32c.value(a + b)
    assert crc32c(b, crc32c(a)) == google_crc32c.value(a + b)


@pytest.mark.parametrize("kernel", KERNELS)
def test_read_only_arrays(kernel) -> None:  # type: ignore[no-untyped-def]
    data = np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    ro = np.frombuffer(data, np.uint8)
    assert not ro.flags.writeable
    assert kernel(ro, 3, 4999, 0) == google_crc32c.value(data[3:4999])
    # A writeable buffer viewed read-only types the same way as a PROT_READ grant.
    view = np.frombuffer(bytearray(data), np.uint8)
    view.flags.writeable = False
    assert kernel(view, 0, 5000, 0) == google_crc32c.value(data)


def test_prot_read_mmap(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = np.random.default_rng(4).integers(0, 256, 9000, dtype=np.uint8).tobytes()
    path = tmp_path / "region"
    path.write_bytes(data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        arr = np.frombuffer(m, np.uint8)
        assert not arr.flags.writeable
        assert crc32c_kernel(arr, 0, arr.size, 0) == google_crc32c.value(data)
        assert crc32c_kernel_table(arr, 1, arr.size, 0) == google_crc32c.value(data[1:])
        del arr


@pytest.mark.parametrize("kernel", KERNELS)
def test_bad_bounds_raise(kernel) -> None:  # type: ignore[no-untyped-def]
    buf = np.zeros(16, np.uint8)
    for start, end in [(-1, 4), (5, 4), (0, 17)]:
        with pytest.raises(ValueError):
            kernel(buf, start, end, 0)


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=3000))
def test_python_api_accepts_buffers(data: bytes) -> None:
    want = google_crc32c.value(data)
    assert crc32c(data) == want
    assert crc32c(bytearray(data)) == want
    assert crc32c(memoryview(data)) == want
    assert crc32c(np.frombuffer(data, np.uint8).copy()) == want
    assert crc32c_py(data) == want


def test_python_api_odd_inputs() -> None:
    data = bytes(range(256)) * 3
    want = google_crc32c.value(data)
    assert crc32c(memoryview(data)[::-1][::-1]) == want  # strided view round trip
    assert crc32c(memoryview(data)[::2]) == google_crc32c.value(data[::2])  # non-contiguous
    words = np.frombuffer(data, np.uint32)
    assert crc32c(words) == want  # any dtype: its bytes
    assert crc32c(np.frombuffer(data, np.uint8)[::2]) == google_crc32c.value(data[::2])


def test_shift_tables_merge_streams() -> None:
    # Register after A||B equals shift(reg(A), |B|) ^ reg(B from 0): the identity the
    # interleaved path relies on, checked here in pure Python.
    a, b = b"\x5a" * 11, bytes(range(checksum._BLK))
    reg_a = crc32c_py(a) ^ 0xFFFFFFFF
    reg_b = crc32c_py(b, 0xFFFFFFFF) ^ 0xFFFFFFFF  # crc32c_py inverts: start from raw 0
    t = checksum._SHIFT
    shifted = int(
        t[0, reg_a & 0xFF]
        ^ t[1, (reg_a >> 8) & 0xFF]
        ^ t[2, (reg_a >> 16) & 0xFF]
        ^ t[3, reg_a >> 24]
    )
    assert (shifted ^ reg_b) ^ 0xFFFFFFFF == crc32c_py(a + b)
