"""Checkpoints beyond a plain state_dict() round trip (that one is tested with each optimizer).

torch.distributed.checkpoint: a run saved with get_state_dict + dcp.save and resumed into a new
model and optimizer with dcp.load + set_state_dict continues bit-identically (one process here;
FSDP2 over two ranks in test_distributed.py). And an optimizer copied or pickled together with
its model trains on as the original does.

DCP keeps only 'state' and 'param_groups' and loads only the entries its target (built from the
new optimizer) already has: NSO's RNG position therefore travels in every saved param group,
and the base optimizer's state exists from construction (flatfused/optim/base_step.py)."""
import pytest
import torch

import flatfused
from cases import NSO_BASES as BASES

dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # noqa: E402
X = torch.randn(6, 5)


def make(kind, base, seed):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    cls, kw = BASES[base]
    if kind == "nso":
        opt = flatfused.NSO(model, cls, sigma=0.05, lam=0.0, use_neg=True, seed=seed, **kw)
    elif kind == "sam":
        opt = flatfused.SAM(model.parameters(), cls, rho=0.05, **kw)
    else:
        opt = flatfused.WeightedSAM(model, cls(model.parameters(), **kw), rho=0.05)
    return model, opt


def train_step(kind, model, opt, step):
    x = X + 0.1 * step

    def closure():
        loss = model(x).square().mean()
        loss.backward()
        return loss
    opt.zero_grad()
    if kind == "sam":
        closure()
    opt.step(closure)


# (DCP's notice that it saves and loads in one process: what this test means it to do)
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("kind", ["nso", "sam", "wsam"])
def test_resume_through_dcp_is_bit_identical(tmp_path, kind, base):
    model, opt = make(kind, base, seed=5)
    for step in range(2):
        train_step(kind, model, opt, step)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))

    resumed, resumed_opt = make(kind, base, seed=99)  # another seed: it must come from the file
    assert len(resumed_opt.state) == len(list(resumed.parameters()))  # targets for every entry
    model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=str(tmp_path))
    set_state_dict(resumed, resumed_opt, model_state_dict=loaded["model"],
                   optim_state_dict=loaded["optim"])
    if kind == "nso":
        assert resumed_opt.seed == 5
    for step in range(2, 5):
        train_step(kind, model, opt, step)
        train_step(kind, resumed, resumed_opt, step)
        for p, q in zip(model.parameters(), resumed.parameters()):
            assert torch.equal(p, q)
    assert all("flatfused" not in g for g in resumed_opt.param_groups)  # saved copies only


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_state_created_at_construction_steps_as_no_state(base):
    """The zero state made up front gives the same steps as the base optimizer's own lazy one
    (lam = 1: the NSO step is the plain base step)."""
    model, opt = make("nso", base, seed=1)
    opt.lam = 1.0
    torch.manual_seed(0)
    twin = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    cls, kw = BASES[base]
    plain = cls(twin.parameters(), **kw)
    for step in range(3):
        train_step("nso", model, opt, step)
        plain.zero_grad()
        (twin(X + 0.1 * step).square().mean()).backward()
        plain.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_state_stays_lazy_where_zeros_would_step_differently():
    """SGD's first momentum buffer is the gradient itself, undamped: with dampening the zero
    buffer would not give it, so that state waits for the first step (as torch's does)."""
    model = torch.nn.Linear(3, 2)
    opt = flatfused.NSO(model, torch.optim.SGD, lr=0.1, momentum=0.9, dampening=0.5)
    assert not opt.state
    opt = flatfused.NSO(model, torch.optim.RMSprop, lr=0.1)  # not fused: its own step, its own state
    assert not opt.state


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("kind", ["nso", "sam", "wsam"])
def test_a_copied_or_pickled_optimizer_continues_identically(kind, how):
    """torch.optim.Optimizer pickles only defaults, state and param_groups; the wrappers keep
    their whole state (base optimizer, flat buffers, RNG), so a model and optimizer copied
    together (deepcopy, or torch.save of both) train on as the originals do."""
    import copy
    import io
    model, opt = make(kind, "adamw", seed=5)
    train_step(kind, model, opt, 0)
    if how == "deepcopy":
        both = copy.deepcopy({"model": model, "opt": opt})
    else:
        buf = io.BytesIO()
        torch.save({"model": model, "opt": opt}, buf)
        buf.seek(0)
        both = torch.load(buf, weights_only=False)
    twin, twin_opt = both["model"], both["opt"]
    assert twin_opt.base_optimizer.param_groups is twin_opt.param_groups
    for step in range(1, 4):
        train_step(kind, model, opt, step)
        train_step(kind, twin, twin_opt, step)
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)
