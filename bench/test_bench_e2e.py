"""pytest-benchmark: whole training steps (forward and backward included) of a ResNet-18-sized
CNN and a small ViT, AdamW as the base (``pytest bench/test_bench_e2e.py``, run by hand).

Compare the ``nso flatfused`` step with the ``adamw`` step of the same model (the goal: at most
2.1x). FLATFUSED_BENCH_BATCH (default 8) and FLATFUSED_BENCH_MODELS pick the workload.
"""
import os

import pytest
import torch

from flatfused import benchmark as fb

BATCH = int(os.environ.get("FLATFUSED_BENCH_BATCH", "8"))
MODELS = os.environ.get("FLATFUSED_BENCH_MODELS", "resnet18,vit").split(",")
ROUNDS = int(os.environ.get("FLATFUSED_BENCH_ROUNDS", "3"))
CONTENDERS = [c for c in fb.E2E_CONTENDERS if fb.e2e.e2e_unavailable_reason(c, "cpu") is None]


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("model_name", MODELS)
def test_training_step(benchmark, model_name, contender):
    torch.manual_seed(0)
    model = fb.make_model(model_name)
    model.train()
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
    opt, step = fb.e2e_step(contender, model, batch, backend="auto")
    step()  # warm-up
    benchmark.group = f"e2e {model_name} batch {BATCH}"
    benchmark.extra_info["params"] = sum(p.numel() for p in model.parameters())
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1)
