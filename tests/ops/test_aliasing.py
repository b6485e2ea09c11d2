"""flatfused.ops refuses operands that share memory with a written one, on every backend (the
kernels stream through them in parallel chunks: an overlap would be a race), and allows what
docs/kernels.md allows: w0 passed as w itself."""
import itertools

import pytest
import torch

from flatfused import ops
from kernel_cases import assert_close, pairs_param


def _scalar():
    return torch.zeros(1)


def _overlapping_calls(rng):
    """(op, call(buf) with operands cut from one buffer, names in the expected message)."""

    def z(n=8):
        return torch.zeros(n)

    kw = dict(lr=0.1)
    adam = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, step=1)
    return [
        ("noise_", lambda b: ops.noise_(rng.view(torch.float32), rng), "out and rng"),
        ("perturb_", lambda b: ops.perturb_(b[:8], b[4:12], rng, save=True), "w and w0"),
        ("perturb_", lambda b: ops.perturb_(b[:8], z(), rng, grad=b[7:15]), "grad and w"),
        ("accumulate_", lambda b: ops.accumulate_(b[:8], b[4:12]), "acc and grad"),
        ("accumulate_perturb_",
         lambda b: ops.accumulate_perturb_(z(), b[:8], b[2:10], z(), rng), "acc and w0"),
        ("restore_", lambda b: ops.restore_(z(), z(), b[:8], b[1:9]), "grad and src"),
        ("restore_", lambda b: ops.restore_(b[:8], b[3:11]), "w and w0"),
        ("sgd_step_", lambda b: ops.sgd_step_(z(), None, b[:8], None, b[5:13], momentum=0.9, **kw),
         "momentum_buffer and grad"),
        ("sgd_step_", lambda b: ops.sgd_step_(b[:8], None, z(), b[6:14], z(), momentum=0.9, **kw),
         "w and src"),
        ("adam_step_", lambda b: ops.adam_step_(z(), None, z(), None, b[:8], b[4:12], **adam),
         "exp_avg and exp_avg_sq"),
        ("adam_step_", lambda b: ops.adam_step_(z(), b[:8], b[4:12], None, z(), z(), **adam),
         "grad and w0"),
        ("grad_norm_sq_", lambda b: ops.grad_norm_sq_(b[:1], b[:8]), "out and grad"),
        ("sam_ascent_", lambda b: ops.sam_ascent_(b[:8], b[:8], z(), None, _scalar(), 0.05),
         "w and w0"),
        ("sam_ascent_", lambda b: ops.sam_ascent_(z(), z(), b[:8], b[4:12], _scalar(), 0.05),
         "g0 and grad"),
    ]


@pytest.mark.parametrize("case", range(len(_overlapping_calls(ops.rng_state(0, 0)))))
def test_overlapping_operands_are_refused_before_any_write(case):
    rng = ops.rng_state(3, 4)
    op, call, names = _overlapping_calls(rng)[case]
    buf = torch.arange(32, dtype=torch.float32)
    with pytest.raises(ValueError, match=f"flatfused.{op}: {names} must not share memory"):
        call(buf)
    assert torch.equal(buf, torch.arange(32, dtype=torch.float32))
    assert rng.tolist() == [3, 4]


def test_adjacent_and_interleaved_operands_are_fine():
    buf = torch.randn(32)
    ops.accumulate_(buf[:8], buf[8:16], 0.5)  # adjacent
    grid = torch.randn(8, 2)
    ops.restore_(grid[:, 0], grid[:, 1])  # interleaved columns: their spans meet, no element does
    assert torch.equal(grid[:, 0], grid[:, 1])
    grid = torch.randn(8, 3)
    expected = grid[:, 0] + 0.5 * grid[:, 1]
    ops.accumulate_(grid[:, 0], grid[:, 1], 0.5, zero_grad=True)
    assert torch.equal(grid[:, 0], expected) and not grid[:, 1].any()


def _non_contiguous_overlaps(rng):
    """(call(grid), names): non-contiguous operands whose elements meet. A contiguous copy of
    each goes to the kernel, so the kernel sees no overlap; the copies written back would land
    on each other's elements."""
    adam = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, step=1)
    return [
        (lambda g: ops.perturb_(g[:, 0], g.new_zeros(8), rng, grad=g[:, 0]), "grad and w"),
        # the same first address and length, not the same elements: w0 is not w
        (lambda g: ops.perturb_(g[:, 0], g[0, :], rng, save=True), "w and w0"),
        (lambda g: ops.accumulate_(g.new_zeros(8), g[:, 1], zero_grad=True), None),
        (lambda g: ops.restore_(g[:, 2], g[1:, :].reshape(-1)[::2][:8]), "w and w0"),
        (lambda g: ops.adam_step_(g.new_zeros(8), None, g.new_zeros(8), None, g[:, 3],
                                  g.t()[3], **adam), "exp_avg and exp_avg_sq"),
    ]


@pytest.mark.parametrize("case", range(len(_non_contiguous_overlaps(ops.rng_state(0, 0)))))
def test_non_contiguous_operands_are_checked_element_by_element(case):
    rng = ops.rng_state(3, 4)
    call, names = _non_contiguous_overlaps(rng)[case]
    grid = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    if names is None:  # no element shared with a written operand
        call(grid)
        return
    with pytest.raises(ValueError, match=f"{names} must not share memory"):
        call(grid)
    assert torch.equal(grid, torch.arange(64, dtype=torch.float32).reshape(8, 8))


def test_non_contiguous_w0_may_be_w_itself():
    grid = torch.randn(6, 4)
    w = grid[:, 1]
    expected = w + 0.1 * ops.noise(6, 5, 6)
    ops.perturb_(w, w, ops.rng_state(5, 6), sigma=0.1, save=True)
    assert_close(grid[:, 1], expected, torch.float32)


@pairs_param()
def test_w0_may_be_w_itself(backend, device):
    n = 4097
    w = torch.randn(n, device=device)
    rng = ops.rng_state(5, 6, device)
    expected = w.cpu() + 0.1 * ops.noise(n, 5, 6)
    ops.perturb_(w, w, rng, sigma=0.1, save=True, backend=backend)  # w += sigma * eps
    assert_close(w, expected, torch.float32)
    grad, buf = torch.randn(n, device=device), torch.zeros(n, device=device)
    expected = w.cpu() - 0.1 * grad.cpu()
    ops.sgd_step_(w, w, grad, None, buf, lr=0.1, momentum=0.9, first_step=True, backend=backend)
    assert_close(w, expected, torch.float32)
    before = w.clone()
    ops.restore_(w, w, backend=backend)
    assert torch.equal(w, before)


def test_element_check_against_brute_force(monkeypatch):
    """flatfused._memory.share_elements (chunked, here 3 elements at a time) against the sets
    of bytes each view covers, over views of one buffer with several strides, offsets and
    element sizes."""
    from flatfused import _memory
    monkeypatch.setattr(_memory, "_CHUNK", 3)
    base = torch.zeros(96, dtype=torch.float32)
    views = [base[:12], base[5:9], base[::2][:10], base[1::2][:10], base[::3][:8],
             base.view(8, 12)[:, 3], base.view(8, 12)[2:5, ::4], base.view(12, 8).t()[1],
             base.view(torch.float16)[1::4][:9], base.view(torch.float16)[6:30:7]]

    def byte_set(t):  # t[index] is a 0-d view: its data_ptr is the element's address
        starts = [t[index].data_ptr() for index in itertools.product(*map(range, t.shape))]
        return {s + k for s in starts for k in range(t.element_size())}

    for a in views:
        for b in views:
            expected = bool(byte_set(a) & byte_set(b))
            a_start, a_end = _memory.span(a)
            b_start, b_end = _memory.span(b)
            spans_meet = a_start < b_end and b_start < a_end
            assert (spans_meet and _memory.share_elements(a, b)) == expected, (a.stride(), b.stride())


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_written_operands_and_autograd(backend):
    """The kernels have no derivative: a written operand that autograd would track is refused;
    under no_grad the write bumps the version counter as torch's in-place ops do, so a graph
    that saved the tensor fails at backward instead of silently using the new values."""
    rng = ops.rng_state(1, 2)
    leaf = torch.nn.Parameter(torch.zeros(8))
    with pytest.raises(RuntimeError, match="no derivative"):
        ops.zero_(leaf, backend=backend)
    x = torch.ones(8, requires_grad=True)
    p = x * 1.0
    y = (p * p).sum()
    with pytest.raises(RuntimeError, match="no derivative"):
        ops.perturb_(p, torch.zeros(8), rng, save=True, backend=backend)
    with torch.no_grad():
        before = p._version
        ops.perturb_(p, torch.zeros(8), rng, save=True, backend=backend)
        assert p._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
