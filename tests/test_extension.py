"""A missing or broken compiled extension never breaks ``import flatfused``: warn once, fall back."""
import subprocess
import sys
import textwrap

import pytest
import torch

from flatfused import _extension, backends


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
    no-page-fault test, tests/test_allocator.py, failed now and then.)"""
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
