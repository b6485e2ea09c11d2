"""Models, data and settings that several test files use: one statement of each, imported from
here (``from cases import ...``; tests/ is on the path through its conftest) rather than from
another test file."""
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from kernel_cases import compiled_backend_device_pairs

ROOT = Path(__file__).resolve().parents[1]

# The backends an optimizer test runs on this machine's CPU: the specification and every
# compiled one.
CPU_BACKENDS = ["torch"] + sorted({b for b, d in compiled_backend_device_pairs() if d == "cpu"})


# ------------------------------------------------------------------- the optimizers' MLP

class Net(torch.nn.Module):
    """An MLP with a frozen parameter and a non-contiguous (transposed) weight."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 9)
        self.fc2 = torch.nn.Linear(9, 4)
        self.frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)
        self.proj = torch.nn.Parameter(torch.randn(5, 4).t())  # 4x5, strides (1, 4)
        self.empty = torch.nn.Parameter(torch.zeros(0, 3))  # a zero-size parameter

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc2(h) @ self.proj + self.frozen.sum() + self.empty.sum()


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Net().to(dtype)


def batch(step, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(32, 6, generator=g).to(dtype), torch.randn(32, 5, generator=g).to(dtype)


def loss_fn(model, data):
    x, y = data
    return F.mse_loss(model(x).float(), y.float())


# The base optimizers the NSO tests wrap (every fused kind, and one that is not fused).
NSO_BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.01)),
    "rmsprop": (torch.optim.RMSprop, dict(lr=1e-2, momentum=0.5)),
}

# The base optimizers the SAM and Weighted SAM tests wrap.
SAM_BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
}


# ------------------------------------------------------------------- a CNN with BatchNorm

class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        # no bias before BatchNorm: its true gradient is 0, and Adam would amplify rounding noise
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(6)
        self.fc = torch.nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def cnn_batch(step):
    g = torch.Generator().manual_seed(7 + step)
    return torch.randn(8, 3, 4, 4, generator=g), torch.randint(0, 5, (8,), generator=g)


def cnn_loss(model, data):
    x, y = data
    return F.cross_entropy(model(x), y)


def make_case(kind):
    """(model, batch of step, loss) of the MLP ("mlp") or the CNN ("cnn"), seeded alike."""
    torch.manual_seed(0)
    return (Net(), batch, loss_fn) if kind == "mlp" else (SmallCNN(), cnn_batch, cnn_loss)


def closure_for(model, opt, loss, data):
    def closure():
        opt.zero_grad()
        value = loss(model, data)
        value.backward()
        return value
    return closure


# ------------------------------------------------------------------- sharpness: exact values

def mlp_and_batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(),
                                torch.nn.Linear(10, 3)).to(dtype)
    x = torch.randn(32, 6, dtype=dtype, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    return model, x, y


def exact(model, loss_fn, x, y):
    """Loss, gradient and Hessian of the flattened parameters, by torch.func."""
    from torch.func import functional_call

    named = list(model.named_parameters())
    w = torch.cat([p.detach().reshape(-1) for _, p in named])

    def f(flat):
        params, i = {}, 0
        for n, p in named:
            params[n] = flat[i:i + p.numel()].view(p.shape)
            i += p.numel()
        return loss_fn(functional_call(model, params, (x,)), y)

    return float(f(w)), torch.func.grad(f)(w), torch.autograd.functional.hessian(f, w), f, w


# ------------------------------------------------------------------- the docs' examples

def python_blocks(path=ROOT / "README.md"):
    """The ```python fenced blocks of a Markdown file, in order."""
    return re.findall(r"^```python\n(.*?)^```", Path(path).read_text(), flags=re.S | re.M)


def docs_namespace():
    """A small model (with BatchNorm), a loader of 3 batches and a loss, for the docs' examples
    that use a ``model``, ``loader`` and ``loss_fn`` of the reader's own."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.ReLU(), torch.nn.Linear(16, 3))
    data = [(torch.randn(12, 8), torch.randint(0, 3, (12,))) for _ in range(3)]
    return {"model": model, "loader": data, "loss_fn": torch.nn.functional.cross_entropy}


# ------------------------------------------------------------------- the frameworks' AdamW runs

def adamw_moments(optimizer):
    state = optimizer.state_dict()["state"]
    return [(s["exp_avg"], s["exp_avg_sq"]) for _, s in sorted(state.items())]


def assert_same_adamw_training(plain, flat, start, steps, lr, gradient_rounding):
    """``plain`` and ``flat``: (model, optimizer) of two runs of ``steps`` AdamW steps (eps 1)
    from the weights of ``start``, one with torch's AdamW, one through a flatfused optimizer
    that should reduce to it, agree to the rounding (the derivation of
    tests/integration/test_open_clip.py's assert_same_training):

    - A gradient element may differ by ``gradient_rounding * G``, G the largest gradient
      element (estimated from the saved first moments): reductions summed in another order
      (oneDNN blocks them by the tensors' alignment, and a flat buffer's views align
      differently), and the clipping coefficient, max_norm / ||g||, whose norm sums the ~30k
      squares in another order: (n - 1) * 2**-24 < 2**-9 relative.
    - With eps = 1, far above these gradients, Adam's step is linear in the gradient: a
      gradient difference d moves a weight by at most lr * d per step.
    - The fused update orders its few operations differently from torch's (2**-20 lr G), and
      each step rounds the weight once (2**-23 relative).
    Over ``steps`` steps: |dw| <= steps (2**-23 |w| + lr (gradient_rounding + 2**-20) G); the
    moments are linear in the gradients: |dm| <= gradient_rounding G, |dv| <= 2
    gradient_rounding G**2."""
    pairs = list(zip(adamw_moments(plain[1]), adamw_moments(flat[1])))
    G = max(float(m.abs().max()) for (m, _), _ in pairs) / (1 - 0.9 ** steps)
    atol = steps * lr * (gradient_rounding + 2.0**-20) * G
    moved = 0.0
    for (name, want), got, begin in zip(plain[0].named_parameters(), flat[0].parameters(),
                                        start.parameters()):
        torch.testing.assert_close(got, want, rtol=steps * 2.0**-23, atol=atol, msg=name)
        moved = max(moved, float((want - begin).detach().abs().max()))
    # The comparison can fail: the weights moved far more than the tolerance.
    assert moved > 10 * atol, (moved, atol)
    for ((m, v), (m2, v2)) in pairs:
        torch.testing.assert_close(m2, m, rtol=0, atol=gradient_rounding * G)
        torch.testing.assert_close(v2, v, rtol=0, atol=2 * gradient_rounding * G * G)
