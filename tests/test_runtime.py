"""leanconv.runtime: the allocator setting the benchmarks and the CLI apply."""

import ctypes.util
import platform

import pytest

from leanconv import runtime


def test_tune_allocator_on_glibc_and_reported():
    applies = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert runtime.tune_allocator(1 << 30) is applies
    if applies:
        assert "glibc malloc tuned (mmap/trim threshold 1024 MiB)" in runtime.allocator_setup()
    assert ctypes.util.find_library("c") or not applies


@pytest.mark.parametrize("threshold", [0, -5, 1.5, "1G"])
def test_tune_allocator_rejects_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold must be a positive number of bytes"):
        runtime.tune_allocator(threshold)


def test_allocator_setup_names_environment(monkeypatch):
    monkeypatch.setattr(runtime, "_TUNED", {})
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert runtime.allocator_setup() == "glibc malloc defaults"
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert "LD_PRELOAD=/usr/lib/libjemalloc.so.2" in runtime.allocator_setup()
    assert runtime.tune_allocator() is False  # a preloaded allocator is left in charge
