"""SAMEdgeTracker: exact values on a small float64 MLP, no effect on training, the files."""
import csv
import json
import math

import pytest
import torch

import flatfused
from cases import exact, mlp_and_batch
from flatfused.sharpness import SAMEdgeTracker, sam_edge

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def test_values_match_exact_hessian_and_formula():
    model, x, y = mlp_and_batch()
    loss_fn = torch.nn.functional.cross_entropy
    opt = flatfused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.3)
    tracker = SAMEdgeTracker(model, loss_fn, opt, every=1, iters=500, tol=1e-12)
    row = tracker.step((x, y))
    loss, g, h, f, w = exact(model, loss_fn, x, y)
    evals, evecs = torch.linalg.eigh(h)
    i = int(torch.argmax(evals.abs()))
    v1 = evecs[:, i]
    assert row["step"] == 0 and row["lr"] == 0.3 and row["rho"] == 0.05
    assert row["loss"] == pytest.approx(loss, rel=1e-12)
    assert row["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-10)
    assert row["top_eigenvalue"] == pytest.approx(float(evals[i]), rel=1e-8)
    assert row["two_over_lr"] == pytest.approx(2 / 0.3)
    assert row["sam_edge"] == sam_edge(row["grad_norm"], 0.05, 0.3)
    # the eigenvector converges as the square root of the eigenvalue: looser
    assert row["grad_alignment"] == pytest.approx(float(abs(g @ v1) / g.norm()), rel=1e-4)
    g_sam = torch.func.grad(f)(w + 0.05 * g / g.norm())
    assert row["sam_grad_alignment"] == pytest.approx(float(abs(g_sam @ v1) / g_sam.norm()),
                                                      rel=1e-4)


def test_warm_start_converges_in_few_products_and_every():
    model, x, y = mlp_and_batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = SAMEdgeTracker(model, torch.nn.functional.cross_entropy, opt, every=3, iters=200,
                             tol=1e-6)
    rows = [tracker.step((x, y)) for _ in range(7)]
    assert [r is not None for r in rows] == [True, False, False, True, False, False, True]
    assert tracker.column("step") == [0, 3, 6]
    first, second = tracker.rows[0]["hvps"], tracker.rows[1]["hvps"]
    assert second <= 3 < first  # same weights: the previous eigenvector is already converged
    assert tracker.rows[1]["top_eigenvalue"] == pytest.approx(tracker.rows[0]["top_eigenvalue"],
                                                              rel=1e-5)
    # a plain optimizer has no rho: the SAM edge is gradient descent's, no SAM gradient
    assert rows[0]["rho"] == 0.0 and rows[0]["sam_edge"] == rows[0]["two_over_lr"] == 20.0
    assert math.isnan(rows[0]["sam_grad_alignment"])


@pytest.mark.filterwarnings("ignore:Detected call of")  # the scheduler steps before the optimizer on purpose
def test_lr_follows_scheduler_and_finite_difference_agrees():
    model, x, y = mlp_and_batch()
    opt = flatfused.NSO(model.parameters(), torch.optim.SGD, sigma=0.01, lr=0.4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ad = SAMEdgeTracker(model, torch.nn.functional.cross_entropy, opt, every=1, iters=300,
                        tol=1e-10)
    fd = SAMEdgeTracker(model, torch.nn.functional.cross_entropy, opt, every=1, iters=300,
                        tol=1e-10, hvp_method="finite_difference", fd_eps=1e-4)
    a = ad.step((x, y))
    b = fd.step((x, y))
    assert b["top_eigenvalue"] == pytest.approx(a["top_eigenvalue"], rel=1e-5)
    assert b["grad_norm"] == a["grad_norm"]
    sched.step()
    assert ad.step((x, y))["two_over_lr"] == pytest.approx(2 / 0.2)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 12)
        self.bn = torch.nn.BatchNorm1d(12)
        self.drop = torch.nn.Dropout(0.3)
        self.fc2 = torch.nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def _train(track, mode, optimizer):
    torch.manual_seed(0)
    model = Net()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g))
            for _ in range(6)]
    loss_fn = torch.nn.functional.cross_entropy
    if optimizer == "sam":
        opt = flatfused.SAM(model, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    tracker = SAMEdgeTracker(model, loss_fn, opt, every=2, iters=5, mode=mode,
                             hvp_method="autograd" if mode == "eval" else "finite_difference")
    model.train()
    for x, y in data:
        if track:
            tracker.step((x, y))
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if optimizer == "sam":
            opt.step(lambda: loss_fn(model(x), y).backward())
        else:
            opt.step()
        sched.step()
    state = [t.clone() for t in model.state_dict().values()]
    state += [p.grad.clone() for p in model.parameters()]
    state += [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    return state, model.training, len(tracker)


@pytest.mark.parametrize("mode,optimizer", [("eval", "sam"), ("train", "sgd")])
def test_training_with_tracker_is_bit_identical(mode, optimizer):
    plain, training, n0 = _train(False, mode, optimizer)
    tracked, training_t, n = _train(True, mode, optimizer)
    assert n0 == 0 and n == 3 and training and training_t
    assert len(plain) == len(tracked)
    for a, b in zip(plain, tracked):
        assert torch.equal(a, b)


def test_files_and_plot(tmp_path):
    model, x, y = mlp_and_batch()
    model, x = model.float(), x.float()  # the fused SGD step takes float32
    opt = flatfused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    tracker = SAMEdgeTracker(model, torch.nn.functional.cross_entropy, opt, every=1, iters=10,
                             sam_gradient=False)
    with pytest.raises(ValueError, match="no measurement"):
        tracker.plot(tmp_path / "empty.png")
    for _ in range(3):
        tracker.step((x, y))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y).backward())
    tracker.to_csv(tmp_path / "edge.csv")
    tracker.to_json(tmp_path / "edge.json")
    with open(tmp_path / "edge.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(SAMEdgeTracker.columns) and len(rows) == 3
    assert float(rows[2]["top_eigenvalue"]) == tracker.rows[2]["top_eigenvalue"]  # full precision
    assert rows[0]["sam_grad_alignment"] == ""  # NaN
    doc = json.loads((tmp_path / "edge.json").read_text())
    assert doc["rows"][1]["sam_edge"] == tracker.rows[1]["sam_edge"]
    assert doc["rows"][0]["sam_grad_alignment"] is None and doc["config"]["every"] == 1
    for name in ("edge.png", "edge.pdf"):
        tracker.plot(tmp_path / name)
        head = (tmp_path / name).read_bytes()[:5]
        assert head == (b"\x89PNG\r" if name.endswith("png") else b"%PDF-")
    with pytest.raises(ValueError, match=".png or .pdf"):
        tracker.plot(tmp_path / "edge.svg")
    # resume: the state carries the rows, the count and the warm start
    other = SAMEdgeTracker(model, torch.nn.functional.cross_entropy, opt, every=1, iters=10)
    other.load_state_dict(tracker.state_dict())
    assert other.rows == tracker.rows and other.calls == 3
    assert other.step((x, y))["step"] == 3


def test_fixed_data_loader_and_validation():
    model, x, y = mlp_and_batch()
    loss_fn = torch.nn.functional.cross_entropy
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": model[2].parameters(), "lr": 0.2}])
    with pytest.raises(ValueError, match="different 'lr'"):
        SAMEdgeTracker(model, loss_fn, opt).step((x, y))
    whole = SAMEdgeTracker(model, loss_fn, opt, group=1, data=(x, y), iters=100, tol=1e-9)
    split = SAMEdgeTracker(model, loss_fn, opt, group=1, iters=100, tol=1e-9,
                           data=[(x[:20], y[:20]), (x[20:], y[20:])])
    a, b = whole.step(), split.step()
    assert a["lr"] == 0.2
    for key in ("loss", "grad_norm", "top_eigenvalue"):
        assert b[key] == pytest.approx(a[key], rel=1e-7)
    bad = [dict(every=0), dict(iters=0), dict(mode="test"), dict(hvp_method="x"),
           dict(rho=-1.0), dict(lr=0.0), dict(group=5), dict(fd_eps=0.0)]
    for kwargs in bad:
        with pytest.raises(ValueError):
            SAMEdgeTracker(model, loss_fn, opt, **kwargs)
    with pytest.raises(TypeError):
        SAMEdgeTracker(model, loss_fn, "sgd")
    with pytest.raises(ValueError, match="pass lr"):
        SAMEdgeTracker(model, loss_fn)
    with pytest.raises(ValueError, match="no data"):
        SAMEdgeTracker(model, loss_fn, lr=0.1).step()


def test_top_eigenvalues_init_is_a_warm_start():
    from flatfused.sharpness import top_eigenvalues

    model, x, y = mlp_and_batch()
    loss_fn = torch.nn.functional.cross_entropy
    _, _, h, _, _ = exact(model, loss_fn, x, y)
    evals, evecs = torch.linalg.eigh(h)
    i = int(torch.argmax(evals.abs()))
    shapes = [p.shape for p in model.parameters()]
    init, k = [], 0
    for s in shapes:
        n = math.prod(s)
        init.append(evecs[k:k + n, i].reshape(s).clone())
        k += n
    for method in ("power", "lanczos"):
        (value,) = top_eigenvalues(model, loss_fn, (x, y), k=1, method=method, iters=2, tol=0.0,
                                   init=init)
        assert value == pytest.approx(float(evals[i]), rel=1e-9), method
    with pytest.raises(ValueError, match="init must be"):
        top_eigenvalues(model, loss_fn, (x, y), init=init[:-1])
    with pytest.raises(ValueError, match="non-zero"):
        top_eigenvalues(model, loss_fn, (x, y), init=[torch.zeros_like(t) for t in init])


def test_readme_tracker_example_runs(tmp_path, monkeypatch):
    """tests/test_readme.py runs every README block; this one checks what the tracker's block
    records and writes."""
    from cases import docs_namespace as namespace
    from cases import python_blocks

    (block,) = [b for b in python_blocks() if "SAMEdgeTracker" in b]
    monkeypatch.chdir(tmp_path)
    ns = namespace()
    exec(compile(block, "README.md[tracker block]", "exec"), ns)
    assert len(ns["tracker"]) == 2  # 3 batches, every 2nd step
    assert (tmp_path / "edge.csv").exists() and (tmp_path / "edge.png").exists()


def test_diverged_step_logs_a_nan_row_and_recovers():
    """A NaN batch (a diverged step) gives a logged row of NaNs, not an exception; the next
    finite batch is measured afresh (no warm start from a NaN eigenvector)."""
    model, x, y = mlp_and_batch()
    loss_fn = torch.nn.functional.cross_entropy
    tracker = SAMEdgeTracker(model, loss_fn, lr=0.1, rho=0.05, every=1, iters=100, tol=1e-9)
    bad = x.clone()
    bad[0, 0] = float("nan")
    row = tracker.step((bad, y))
    assert math.isnan(row["loss"]) and math.isnan(row["grad_norm"])
    assert math.isnan(row["sam_edge"]) and len(tracker.rows) == 1
    row = tracker.step((x, y))
    fresh = SAMEdgeTracker(model, loss_fn, lr=0.1, rho=0.05, iters=100, tol=1e-9).step((x, y))
    for key in ("loss", "grad_norm", "top_eigenvalue", "sam_edge"):
        assert math.isfinite(row[key])
        assert row[key] == pytest.approx(fresh[key], rel=1e-6)
