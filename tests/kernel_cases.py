"""Shared cases for the cross-backend kernel tests: sizes, dtypes and tolerances."""
import pytest
import torch

from flatfused import backends

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 3, 4095, 4097, 278011]
INTERPRETED_SIZES = [0, 1, 3, 4095, 4097, 20011]  # the Triton interpreter is slow


def sizes_for(backend):
    if backend == "triton" and backends.triton_interpreted():
        return INTERPRETED_SIZES
    return SIZES


def compiled_backend_device_pairs():
    """Backends under test against the ``torch`` specification."""
    from conftest import backend_device_pairs

    return [(b, d) for b, d in backend_device_pairs() if b != "torch"]


def tolerance(dtype):
    """One rounding of the storage dtype (plus fp32 ulps of the math)."""
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-6)
    return dict(rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps)


def assert_close(got, expected, dtype):
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got.cpu().float(), expected.cpu().float(), **tolerance(dtype))


def pairs_param():
    return pytest.mark.parametrize("backend,device", compiled_backend_device_pairs(),
                                   ids=lambda v: str(v))
