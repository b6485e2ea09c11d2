"""What only a GPU shows: no host synchronisation inside a step, and noise draws replayed by a CUDA
graph. (The GPU kernels' arithmetic is checked by every backend-parametrised test, which runs the
cuda and triton backends on CUDA tensors when a GPU is present.) Skipped without CUDA."""
import pytest
import torch

import flatfused
from flatfused.rng import counters_per_draw

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_BACKENDS = ([b for b in ("cuda", "triton") if b in flatfused.backends.available("cuda")]
                if torch.cuda.is_available() else [])


def _model_and_closure():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10)).cuda()
    x = torch.randn(32, 64, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")

    def closure():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return model, closure


def _step_function(kind: str, backend: str, base: str):
    model, closure = _model_and_closure()
    base_cls, kw = {"sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2))}[base]
    if kind in ("nso", "nso three-call"):
        opt = flatfused.NSO(model, base_cls, sigma=0.01, num_perturbs=1, lam=0.0, use_neg=True,
                            backend=backend, seed=0, **kw)
        if kind == "nso":
            return lambda: opt.step(closure)

        def three_call():
            closure()
            opt.store_gradients(zero_grad=True, store_weights=True, update_weight=0.0)
            for store_perturb in (True, False):
                opt.first_step(zero_grad=True, store_perturb=store_perturb)
                closure()
                opt.store_gradients(zero_grad=True, store_weights=False, update_weight=0.5)
            opt.second_step(zero_grad=True)
        return three_call
    if kind in ("sam", "asam"):
        opt = flatfused.SAM(model, base_cls, rho=0.05, adaptive=kind == "asam", backend=backend,
                            **kw)

        def sam_step():
            opt.zero_grad()
            closure()
            opt.step(closure)
        return sam_step
    opt = flatfused.WeightedSAM(model, base_cls(model.parameters(), **kw), rho=0.05, gamma=0.9,
                                backend=backend)

    def wsam_step():
        opt.zero_grad()
        opt.step(closure)
    return wsam_step


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("kind", ["nso", "nso three-call", "sam", "asam", "wsam"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_a_step_does_not_synchronise_with_the_host(backend, kind, base):
    step = _step_function(kind, backend, base)
    for _ in range(2):  # the first step builds the flat buffers and the state
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_noise_draws_replay_in_a_cuda_graph(backend):
    """A graph captured over a draw and the offset's advance draws the next noise at each
    replay: (seed, offset) live on the device, so nothing is baked into the graph."""
    n, seed = (1 << 20) + 3, 11
    per_draw = counters_per_draw(n)
    rng = flatfused.ops.rng_state(seed, 0, "cuda")
    out = torch.empty(n, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (Triton compiles) outside the capture
        flatfused.ops.noise_(out, rng, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        flatfused.ops.noise_(out, rng, backend=backend)
        rng[1:].add_(per_draw)
    torch.cuda.synchronize()
    assert int(rng[1]) == 0  # capturing ran nothing
    for k in range(3):
        out.fill_(float("nan"))
        graph.replay()
        expected = flatfused.noise(n, seed, k * per_draw, device="cuda", backend=backend)
        assert torch.equal(out, expected)
    assert int(rng[1]) == 3 * per_draw


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_a_whole_nso_step_replays_in_a_cuda_graph_with_a_capturable_base(backend):
    """With a capturable base (AdamW(capturable=True), lr a device tensor: flatfused's restore_,
    then torch's capturable update) a whole ``step(closure)``, forward and backward passes
    included, captured once and replayed, trains as the same steps run eagerly; the RNG
    position a checkpoint reads follows the replays."""
    def make():
        model, closure = _model_and_closure()
        opt = flatfused.NSO(model, torch.optim.AdamW, sigma=0.01, num_perturbs=1, lam=0.0,
                            use_neg=True, backend=backend, seed=5, capturable=True,
                            lr=torch.tensor(1e-3, device="cuda"), weight_decay=1e-2)
        return model, opt, closure

    warmup, replays = 3, 4
    eager, eager_opt, eager_closure = make()
    for _ in range(warmup + replays):
        eager_opt.step(eager_closure)
    model, opt, closure = make()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # builds the flat buffers and the state, compiles kernels
        for _ in range(warmup):
            opt.step(closure)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step(closure)
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    position = opt.state_dict()["flatfused"]
    want = eager_opt.state_dict()["flatfused"]
    assert (position["next_offset"], position["draw_offset"]) == (
        want["next_offset"], want["draw_offset"])


def test_the_build_has_code_for_this_gpu():
    """gpu_run.sh builds for the visible GPU: its CUDA kernels launch here (else auto would fall
    back to Triton with a warning, and the cuda backend's tests would be skipped unseen)."""
    from flatfused import _extension, backends

    if not _extension.has_cuda_kernels():
        pytest.skip("built without CUDA kernels")
    assert backends._cuda_launch_error(torch.cuda.current_device()) is None
    assert "cuda" in flatfused.backends.available("cuda")
