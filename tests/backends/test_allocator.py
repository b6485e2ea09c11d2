"""flatfused.tune_cpu_allocator: glibc keeps freed memory, so CPU steps stop page-faulting."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

import flatfused
from flatfused import allocator
from flatfused.benchmark import cli as bench_cli
from flatfused.benchmark.measure import minor_faults

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

# Frees at the end of every iteration what the next one allocates again (the shape of a
# forward-backward pass whose gradients stay allocated). Whether default glibc then gives the
# heap back depends on the process's allocation history (a fresh process with torch and
# flatfused imported took 0 or 163680 faults here, run to run), so both runs first pin a low trim
# threshold, as glibc's own default starts (128 KiB): without the tuning every iteration maps
# its 128 MiB again.
_PATTERN = textwrap.dedent("""
    import ctypes, resource, sys, torch, flatfused
    assert ctypes.CDLL("libc.so.6").mallopt(-1, 128 << 10) == 1  # M_TRIM_THRESHOLD
    if sys.argv[1] == "tuned":
        assert flatfused.tune_cpu_allocator()
    keep = torch.ones(1 << 20)
    def iteration():
        blocks = [torch.ones(2 << 20) for _ in range(16)]  # 16 x 8 MiB, written
        del blocks
    for _ in range(3):
        iteration()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        iteration()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults_in_fresh_process(mode: str) -> int:
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD"))}
    out = subprocess.run([sys.executable, "-c", _PATTERN, mode], env=env, check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[-1])


@glibc
def test_tuned_allocator_stops_the_page_faults_of_memory_freed_and_allocated_again():
    assert _faults_in_fresh_process("trimming") > 5 * 1000
    assert _faults_in_fresh_process("tuned") == 0


def test_minor_faults_count_memory_touched_for_the_first_time():
    import mmap

    # A fresh anonymous mapping in small pages: the first write of each page faults once,
    # whatever the allocator (which, tuned by an earlier test, may serve a tensor from memory
    # that already faulted).
    fresh = mmap.mmap(-1, 16 << 20)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        fresh.madvise(mmap.MADV_NOHUGEPAGE)
    pages = len(fresh) // mmap.PAGESIZE
    before = minor_faults()
    for offset in range(0, len(fresh), mmap.PAGESIZE):
        fresh[offset] = 1
    assert minor_faults() - before >= pages
    fresh.close()


@pytest.mark.parametrize("kw", [dict(mmap_threshold=0), dict(mmap_threshold=64 << 20),
                                dict(mmap_threshold=1.5), dict(mmap_threshold=True),
                                dict(trim_threshold=-1), dict(trim_threshold=2**31)])
def test_bad_thresholds_are_refused_before_anything_changes(kw):
    with pytest.raises(ValueError, match="threshold"):
        flatfused.tune_cpu_allocator(**kw)


@pytest.mark.parametrize("name, value", [("MALLOC_ARENA_MAX", "2"),
                                         ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")])
def test_an_allocator_the_user_configured_is_left_alone(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert allocator.allocator_configured() == f"{name}={value}"
    called = []
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda *a: called.append(a))
    assert flatfused.tune_cpu_allocator() is False
    assert not called


def test_bench_notes_page_faults_only_for_flatfused_steps_on_an_untuned_cpu():
    def report(faults, contender="nso flatfused", device="cpu", env=None, tuned=False):
        return dict(device=device, machine=dict(allocator_env=env or {}, allocator_tuned=tuned),
                    e2e=[dict(model="resnet18", batch=32, contender="adamw",
                              page_faults_per_step=0),
                         dict(model="resnet18", batch=32, contender=contender,
                              page_faults_per_step=faults)])

    hint = bench_cli._page_fault_hint(report(27456))
    assert "27456 page faults per step" in hint and "tune_cpu_allocator" in hint
    assert bench_cli._page_fault_hint(report(12)) is None
    assert bench_cli._page_fault_hint(report(27456, contender="nso reference")) is None
    assert bench_cli._page_fault_hint(report(27456, device="cuda:0")) is None
    assert bench_cli._page_fault_hint(report(27456, env={"MALLOC_TOP_PAD_": "1"})) is None
    assert bench_cli._page_fault_hint(report(27456, tuned=True)) is None
    assert bench_cli._page_fault_hint(report(None)) is None
