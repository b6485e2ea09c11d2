"""A missing or broken compiled extension never breaks ``import flatfused``: warn once, fall back."""
import functools
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from flatfused import _extension, backends, flat


def run(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)


def test_broken_extension_falls_back_to_torch_with_one_warning():
    result = run("""
        import sys, warnings
        sys.modules["flatfused._C"] = None  # what a failed import of the extension looks like
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import torch, flatfused
            from flatfused import backends
            assert backends.resolve("auto", "cpu") == "torch"
            assert backends.available("cpu") == ["torch"] or "triton" in backends.available("cpu")
            p = torch.nn.Parameter(torch.ones(10))
            opt = flatfused.NSO([p], torch.optim.SGD, lr=0.1, lam=0.0, use_neg=True, seed=1)
            opt.step(lambda: (p ** 2).sum().backward())
            assert opt.backends == ["torch"]
            try:
                flatfused.noise(4, 0, backend="cpu")
            except RuntimeError as exc:
                assert "did not load" in str(exc)
            else:
                raise AssertionError("backend='cpu' must fail without the extension")
        messages = [str(w.message) for w in caught if "flatfused._C" in str(w.message)]
        assert len(messages) == 1, messages
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_ops_are_registered_once_the_extension_loads():
    """docs/kernels.md: the ops are reachable as torch.ops.flatfused.<name> once the extension
    has loaded: at the first kernel call, or when backends.available() looks for it. (Not at
    import: loading it there changed the heap's history enough that the tuned allocator's
    no-page-fault test, tests/backends/test_allocator.py, failed now and then.)"""
    result = run("""
        import torch, flatfused
        assert "cpu" in flatfused.backends.available("cpu")
        assert callable(torch.ops.flatfused.perturb_)
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_extension_registers_every_op_here():
    """The installed build has the C++ CPU kernels (CI builds them; a failure here is a build bug)."""
    assert _extension.load_error() is None
    for op in ["philox_bits_", "noise_", "perturb_", "zero_", "accumulate_", "accumulate_perturb_",
               "restore_", "sgd_step_", "adam_step_", "grad_norm_sq_", "sam_ascent_"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"flatfused::{op}", "CPU"), op
    assert backends.resolve("auto", "cpu") == "cpu"


def test_auto_backend_can_be_forced(monkeypatch):
    from flatfused import backends

    monkeypatch.setenv("FLATFUSED_AUTO_BACKEND", "torch")
    assert backends.resolve("auto", "cpu") == "torch"
    monkeypatch.setenv("FLATFUSED_AUTO_BACKEND", "nope")
    with pytest.raises(ValueError, match="FLATFUSED_AUTO_BACKEND"):
        backends.resolve("auto", "cpu")
    monkeypatch.setenv("FLATFUSED_AUTO_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="unavailable"):
        backends.resolve("auto", "cpu")


def _pretend_gpu_whose_launches_fail(monkeypatch, error):
    """A CUDA device 0 on which flatfused's CUDA kernels are registered but fail to launch."""
    def launch(device):
        raise RuntimeError(error)

    monkeypatch.setattr(_extension, "has_cuda_kernels", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(backends, "_launch_one_kernel", launch)
    monkeypatch.setattr(backends, "_cuda_launch_error",
                        functools.lru_cache(maxsize=None)(backends._cuda_launch_error.__wrapped__))
    monkeypatch.setattr(backends, "triton_error", lambda: None)
    return backends


def test_cuda_kernels_built_for_other_gpus_are_refused_with_what_to_rebuild(monkeypatch):
    """A build without the GPU's architecture (say, made on a machine without a GPU and run on
    a V100) has registered kernels that fail at their first launch: flatfused tries one kernel
    once per GPU, so backend='cuda' fails early saying what to rebuild, and auto takes Triton
    with one warning instead of every step failing inside a launch."""
    backends = _pretend_gpu_whose_launches_fail(
        monkeypatch, "CUDA error: no kernel image is available for execution on the device\nmore")
    reason = backends.unavailable_reason("cuda", torch.device("cuda", 0))
    assert "compute capability 7.0" in reason and "no kernel image" in reason
    assert 'TORCH_CUDA_ARCH_LIST="7.0"' in reason and "more" not in reason
    with pytest.raises(RuntimeError, match="'cuda' is unavailable.*TORCH_CUDA_ARCH_LIST"):
        backends.resolve("cuda", "cuda:0")
    monkeypatch.delenv("FLATFUSED_AUTO_BACKEND", raising=False)
    monkeypatch.setattr(flat._warn, "_warned", set())
    with pytest.warns(RuntimeWarning, match="'cuda' backend is unavailable on cuda:0.*using triton"):
        assert backends.resolve("auto", "cuda:0") == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", "cuda:0") == "triton"  # warned once


def test_cuda_launch_probe_runs_once_per_gpu_and_never_inside_a_graph_capture(monkeypatch):
    backends = _pretend_gpu_whose_launches_fail(monkeypatch, "no kernel image")
    calls = []
    monkeypatch.setattr(backends, "_launch_one_kernel", lambda device: calls.append(device))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert backends.unavailable_reason("cuda", torch.device("cuda", 0)) is None
    assert calls == []  # a probe would synchronise, which a capture forbids
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    for _ in range(3):
        assert backends.unavailable_reason("cuda", torch.device("cuda")) is None
    assert calls == [torch.device("cuda", 0)]
