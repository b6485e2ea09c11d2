"""The README's code examples run as written (on a small model and loader)."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def namespace():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.ReLU(), torch.nn.Linear(16, 3))
    data = [(torch.randn(12, 8), torch.randint(0, 3, (12,))) for _ in range(3)]
    return {"model": model, "loader": data, "loss_fn": torch.nn.functional.cross_entropy}


# Blocks 0-3: the NSO loops, SAM/WSAM, mixed precision (its "cuda" run here on the CPU).
@pytest.mark.parametrize("index", range(4))
def test_readme_example_runs_and_trains(index):
    blocks = python_blocks()
    assert len(blocks) >= 4, "README lost its usage examples"
    ns = namespace()
    before = [p.detach().clone() for p in ns["model"].parameters()]
    code = blocks[index].replace('"cuda"', '"cpu"')
    exec(compile(code, f"README.md[python block {index}]", "exec"), ns)
    after = list(ns["model"].parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_readme_torch_compile_example_trains_the_compiled_model():
    (code,) = [b for b in python_blocks() if "torch.compile(model)" in b]
    ns = namespace()
    before = [p.detach().clone() for p in ns["model"].parameters()]
    torch._dynamo.reset()
    exec(compile(code, "README.md[torch.compile block]", "exec"), ns)
    assert ns["compiled"]._orig_mod is ns["model"]
    after = list(ns["model"].parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
