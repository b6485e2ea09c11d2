"""Peak memory of the Hessian tools beyond a forward/backward pass, in units of the parameter
bytes P (docs/sharpness.md has the measured table; these bounds leave room above it)."""
import pytest
import torch

from flatfused.sharpness import memory
from flatfused.sharpness.hessian import hessian_trace, top_eigenvalues

F = torch.nn.functional


pytestmark = pytest.mark.usefixtures("one_thread")


def test_peak_bytes_counts_growth_only():
    before = torch.empty(3_000_000)  # 12 MB allocated before the call: its free is not growth

    def work():
        nonlocal before
        a = torch.empty(1_000_000)
        b = torch.empty(2_000_000)
        del a
        before = None
        c = torch.empty(500_000)
        del b, c

    _, peak = memory.peak_bytes(work)
    assert peak == 12_000_000


# Per Hessian-vector product the autograd path holds the first-order gradients (with their
# graph), the probe, the product and the double-backward's own buffers, each at most P, plus
# per-parameter temporaries: about 5 P measured. Hutch++ keeps 2k = 2 m / 3 more vectors (the
# sketch and Q) and Lanczos one per step. C = 7 leaves room for allocator-level differences
# between torch versions without hiding a leak that grows with the number of products.
C = 7


@pytest.mark.parametrize("case,allowed", [
    ("hutchinson", C), ("finite_difference", C), ("power", C),
    ("hutch++", 2 * 12 // 3 + C), ("lanczos", 10 + C),
])
def test_parameter_dominated_model_uses_a_few_p(case, allowed):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Tanh(), torch.nn.Linear(512, 256),
                                torch.nn.Tanh(), torch.nn.Linear(256, 10))
    batch = (torch.randn(8, 256), torch.randint(0, 10, (8,)))
    calls = {
        "hutchinson": lambda m, f, b: hessian_trace(m, f, b, num_probes=6),
        "finite_difference": lambda m, f, b: hessian_trace(m, f, b, num_probes=6,
                                                           hvp_method="finite_difference"),
        "power": lambda m, f, b: top_eigenvalues(m, f, b, k=1, iters=6, tol=0.0),
        "hutch++": lambda m, f, b: hessian_trace(m, f, b, num_probes=12, method="hutch++"),
        "lanczos": lambda m, f, b: top_eigenvalues(m, f, b, k=1, method="lanczos", iters=10),
    }
    (row,) = memory.hessian_memory(model, F.cross_entropy, batch, cases={case: calls[case]})
    assert row["param_bytes"] == 4 * sum(p.numel() for p in model.parameters())
    assert 0 < row["extra"] <= allowed * row["param_bytes"], row
    if case in ("hutchinson", "power", "finite_difference"):
        # more products must not cost more memory (nothing accumulates per product)
        more = {"hutchinson": lambda m, f, b: hessian_trace(m, f, b, num_probes=18),
                "finite_difference": lambda m, f, b: hessian_trace(
                    m, f, b, num_probes=18, hvp_method="finite_difference"),
                "power": lambda m, f, b: top_eigenvalues(m, f, b, k=1, iters=18, tol=0.0)}
        (row3,) = memory.hessian_memory(model, F.cross_entropy, batch, cases={case: more[case]})
        # (measured: exactly equal; the slack is for garbage-collector timing, far below the
        # 12 P a leak of one vector per product would add)
        assert row3["peak"] <= row["peak"] + row["param_bytes"] // 2


def test_activation_dominated_model():
    """Double backward keeps the backward pass's graph: that costs about the forward/backward's
    own activation memory again (measured 1.5x), not a multiple of P; finite differences use
    first-order passes only and stay within a few P."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
                                torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1, stride=2),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16 * 8 * 8, 10))
    batch = (torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))
    rows = memory.hessian_memory(model, F.cross_entropy, batch, cases={
        "autograd": lambda m, f, b: hessian_trace(m, f, b, num_probes=3),
        "fd": lambda m, f, b: hessian_trace(m, f, b, num_probes=3, hvp_method="finite_difference")})
    autograd, fd = rows
    assert autograd["extra"] <= C * autograd["param_bytes"] + 2 * autograd["baseline"], autograd
    assert fd["extra"] <= C * fd["param_bytes"], fd
