"""Mixed precision for NSO, SAM and WSAM: torch.amp.GradScaler's contract, overflow skips,
clipping and gradient accumulation."""
import pytest
import torch
import torch.nn.functional as F

import flatfused

KINDS = ["nso", "sam", "wsam", "wsam_coupled"]


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def make(kind, **kw):
    torch.manual_seed(0)
    model = MLP()
    if kind == "nso":
        opt = flatfused.NSO(model, torch.optim.SGD, sigma=0.05, lr=0.1, momentum=0.9, lam=0.0,
                            use_neg=True, seed=3, **kw)
    elif kind == "sam":
        opt = flatfused.SAM(model, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, **kw)
    else:  # WSAM, by default decoupled; "wsam_coupled": decouple=False
        opt = flatfused.WeightedSAM(model, torch.optim.SGD(model.parameters(), lr=0.1,
                                    momentum=0.9), rho=0.05, gamma=0.8,
                                    decouple=kind == "wsam", **kw)
    return model, opt


def loss_of(model, data, autocast_dtype=None):
    x, y = data
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        return F.cross_entropy(model(x), y)


def train(kind, steps, scaler=None, autocast_dtype=None, poison_pass=None, opt_kw=None,
          model_opt=None):
    """``steps`` steps; the ``poison_pass``-th forward-backward of the last step overflows."""
    model, opt = model_opt or make(kind, **(opt_kw or {}))
    scale = scaler.scale if scaler is not None else (lambda t: t)
    for step in range(steps):
        data = batch(step)
        passes = [0]

        def closure():
            passes[0] += 1
            loss = loss_of(model, data, autocast_dtype)
            if step == steps - 1 and passes[0] == poison_pass:
                loss = loss * float("inf")
            scale(loss).backward()
            return loss

        if kind != "nso":  # NSO's step discards earlier gradients; WSAM's adds to them
            opt.zero_grad()
        if kind == "sam":  # SAM's first pass runs before the step (the reference loop)
            closure()
        if scaler is not None:
            scaler.step(opt, closure)
            scaler.update()
        else:
            opt.step(closure)
    return model, opt


def snapshot(model, opt):
    state = [v.clone() for s in opt.base_optimizer.state.values() for v in s.values()
             if torch.is_tensor(v)]
    return ([p.detach().clone() for p in model.parameters()], state,
            getattr(opt, "_next_offset", None))


def assert_untouched(before, model, opt):
    """Weights, base-optimizer state and RNG position are bit-identical to ``before``
    (a :func:`snapshot`)."""
    weights, state, offset = before
    after_weights, after_state, after_offset = snapshot(model, opt)
    for a, b in zip(weights + state, after_weights + after_state):
        assert torch.equal(a, b)
    assert after_offset == offset  # NSO draws the same noise again


def new_scaler(init_scale=2.0**10):
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    scaler.scale(torch.zeros(()))  # GradScaler creates its scale tensor lazily
    return scaler


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("poison_pass", [1, 2])
def test_overflow_skips_the_whole_step_and_lowers_the_scale(kind, poison_pass):
    scaler = new_scaler()
    model, opt = train(kind, 2, scaler)
    before = snapshot(model, opt)
    train(kind, 1, scaler, poison_pass=poison_pass, model_opt=(model, opt))
    assert scaler.get_scale() == 2.0**9
    assert_untouched(before, model, opt)
    # ... and the next step goes ahead at the lowered scale.
    train(kind, 1, scaler, model_opt=(model, opt))
    assert any(not torch.equal(a, p) for a, p in zip(before[0], model.parameters()))


@pytest.mark.parametrize("kind", KINDS)
def test_scaled_run_equals_unscaled_run(kind):
    # A power-of-two scale unscales exactly: the same weights as without a scaler.
    plain, _ = train(kind, 3)
    scaled, _ = train(kind, 3, new_scaler(2.0**12))
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_tracks_fp32(kind, dtype):
    plain, _ = train(kind, 4)
    scaler = new_scaler() if dtype == torch.float16 else None
    mixed, _ = train(kind, 4, scaler, autocast_dtype=dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    for p, q in zip(plain.parameters(), mixed.parameters()):
        torch.testing.assert_close(q, p, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["nso", "sam"])
def test_max_grad_norm_clips_the_update_direction(kind):
    model, opt = make(kind, max_grad_norm=1e-3)
    train(kind, 1, model_opt=(model, opt))
    norm = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
    assert norm == pytest.approx(1e-3, rel=1e-4)


def test_sam_two_call_loop_with_scaler_unscale_and_clipping():
    """The standard GradScaler recipe around SAM's first/second step."""
    def run(two_call):
        model, opt = make("sam", max_grad_norm=None if two_call else 0.05)
        scaler = new_scaler()
        for step in range(3):
            data = batch(step)
            opt.zero_grad()
            scaler.scale(loss_of(model, data)).backward()
            if two_call:
                opt.first_step(zero_grad=True)
                scaler.scale(loss_of(model, data)).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                scaler.step(opt)  # step() after first_step is the second step
            else:
                scaler.step(opt, lambda: scaler.scale(loss_of(model, data)).backward())
            scaler.update()
        return model

    for p, q in zip(run(True).parameters(), run(False).parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["nso", "wsam"])
def test_gradient_accumulation_over_micro_batches(kind):
    """A closure that runs two half batches (loss / 2 each) is the full-batch step."""
    full, _ = train(kind, 2)
    model, opt = make(kind)
    for step in range(2):
        x, y = batch(step)

        def closure():
            total = 0.0
            for xs, ys in ((x[: len(x) // 2], y[: len(y) // 2]), (x[len(x) // 2:], y[len(y) // 2:])):
                loss = F.cross_entropy(model(xs), ys) * (len(xs) / len(x))
                loss.backward()
                total = total + loss.detach()
            return total

        if kind != "nso":
            opt.zero_grad()
        opt.step(closure)
    for p, q in zip(full.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["nso", "sam"])
def test_bad_max_grad_norm(kind):
    with pytest.raises(ValueError, match="max_grad_norm"):
        make(kind, max_grad_norm=-1.0)
    with pytest.raises(TypeError, match="max_grad_norm"):
        make(kind, max_grad_norm="big")


# ---------------------------------------------------------------- NSO's three-call API

def train_three_call(steps, scaler=None, poison_pass=None, opt_kw=None, model_opt=None,
                     finish="second_step"):
    """The reference trainer's loop (lam=0, use_neg, K=1); the ``poison_pass``-th of the three
    forward-backward passes of the last step overflows. ``finish``: "second_step" (the
    reference), "step" (``optimizer.step()``), or "scaler" (``scaler.step(optimizer)``)."""
    model, opt = model_opt or make("nso", **(opt_kw or {}))
    scale = scaler.scale if scaler is not None else (lambda t: t)
    for step in range(steps):
        data = batch(step)
        for n, (store_perturb, weight) in enumerate([(None, 0.0), (True, 0.5), (False, 0.5)]):
            if store_perturb is not None:
                opt.first_step(zero_grad=True, store_perturb=store_perturb)
            loss = loss_of(model, data)
            if step == steps - 1 and n + 1 == poison_pass:
                loss = loss * float("inf")
            scale(loss).backward()
            opt.store_gradients(zero_grad=True, store_weights=n == 0, update_weight=weight)
        if finish == "scaler":
            scaler.step(opt)
            scaler.update()
        elif finish == "step":
            opt.step()
        else:
            opt.second_step(zero_grad=True)
    return model, opt


@pytest.mark.parametrize("finish", ["step", "scaler"])
def test_three_call_step_without_closure_is_second_step(finish, three_call_mode):
    # scaler.step(optimizer) in the three-call loop: a power-of-two scale unscales exactly.
    plain, _ = train_three_call(3)
    scaler = new_scaler(2.0**12) if finish == "scaler" else None
    other, _ = train_three_call(3, scaler, finish=finish)
    closure_form, _ = train("nso", 3)
    for p, q, r in zip(plain.parameters(), other.parameters(), closure_form.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(r, p, rtol=1e-5, atol=1e-6)


def make_nso(base):
    if base == "sgd":
        return make("nso")
    torch.manual_seed(0)
    model = MLP()
    return model, flatfused.NSO(model, torch.optim.AdamW, sigma=0.05, lr=1e-2, lam=0.0,
                                use_neg=True, seed=3)


@pytest.mark.parametrize("poison_pass", [2, 3])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_three_call_overflow_skips_the_whole_step(poison_pass, base, three_call_mode):
    scaler = new_scaler()
    model, opt = train_three_call(2, scaler, model_opt=make_nso(base), finish="scaler")
    before = snapshot(model, opt)
    train_three_call(1, scaler, poison_pass=poison_pass, model_opt=(model, opt), finish="scaler")
    assert scaler.get_scale() == 2.0**9
    assert_untouched(before, model, opt)
    # The next step goes ahead at the lowered scale with the noise the skipped one drew: the
    # run continues as one without the skipped step.
    train_three_call(1, scaler, model_opt=(model, opt), finish="scaler")
    reference = train_three_call(2, model_opt=make_nso(base))
    train_three_call(1, model_opt=reference)
    for p, q in zip(reference[0].parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_three_call_clean_pass_overflow_with_lam_zero_is_dropped():
    # lam == 0: the clean gradient has weight 0 and is never read, so its overflow is harmless
    # (the reference multiplies it by 0 and poisons its accumulator with NaN).
    scaler = new_scaler()
    model, _ = train_three_call(1, scaler, poison_pass=1, finish="scaler")
    assert scaler.get_scale() == 2.0**10
    plain, _ = train_three_call(1)
    for p, q in zip(plain.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_three_call_max_grad_norm_clips_the_accumulated_direction(three_call_mode):
    # step() is second_step(): .grad then holds the clipped direction.
    model, _ = train_three_call(1, opt_kw=dict(max_grad_norm=1e-3), finish="step")
    norm = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
    assert norm == pytest.approx(1e-3, rel=1e-4)
    # second_step(zero_grad=True) clips too: the trajectory of step(closure) with the same clip.
    clipped, _ = train_three_call(2, opt_kw=dict(max_grad_norm=1e-3))
    closure_form, _ = train("nso", 2, opt_kw=dict(max_grad_norm=1e-3))
    unclipped, _ = train_three_call(2)
    for p, q, r in zip(closure_form.parameters(), clipped.parameters(), unclipped.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(r, q)


def test_three_call_unscale_before_step_warns():
    model, opt = make("nso")
    scaler = new_scaler()
    data = batch(0)
    scaler.scale(loss_of(model, data)).backward()
    opt.store_gradients(zero_grad=True, store_weights=True, update_weight=0.0)
    opt.first_step(zero_grad=True)
    scaler.scale(loss_of(model, data)).backward()
    opt.store_gradients(zero_grad=True, update_weight=1.0)
    scaler.unscale_(opt)
    with pytest.warns(RuntimeWarning, match="accumulator"):
        scaler.step(opt)
    scaler.update()
    # The direction was unscaled anyway: the same step as without a scaler.
    plain, popt = make("nso")
    loss_of(plain, data).backward()
    popt.store_gradients(zero_grad=True, store_weights=True, update_weight=0.0)
    popt.first_step(zero_grad=True)
    loss_of(plain, data).backward()
    popt.store_gradients(zero_grad=True, update_weight=1.0)
    popt.step()
    for p, q in zip(plain.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_nso_step_without_closure_outside_the_three_call_loop_raises():
    model, opt = make("nso")
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    train_three_call(1, model_opt=(model, opt))  # its second_step closes the step
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_sam_second_step_applies_max_grad_norm():
    model, opt = make("sam", max_grad_norm=1e-3)
    data = batch(0)
    loss_of(model, data).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, data).backward()
    opt.second_step()
    norm = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
    assert norm == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_a_step_that_raises_under_the_scaler_leaves_no_scaling_behind(kind):
    """GradScaler.step sets grad_scale/found_inf on the optimizer and deletes them only when the
    step returns: a closure raising inside it must not leave them for later unscaled steps."""
    scaler = new_scaler()
    model, opt = train(kind, 1, scaler)
    twin, twin_opt = train(kind, 1, new_scaler())
    if kind == "sam":
        opt.zero_grad()
        loss_of(model, batch(1)).backward()

    def failing():
        raise KeyError("data loader died")

    with pytest.raises(KeyError):
        scaler.step(opt, failing)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    train(kind, 2, model_opt=(model, opt))  # without a scaler now
    train(kind, 2, model_opt=(twin, twin_opt))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_sam_closure_alone_under_a_scaler_equals_the_unscaled_step():
    """scaler.step(opt, closure) with no .grad at the call (Lightning's and Accelerate's form):
    the closure's first pass is scaled too, unscaled once with the second (power of two:
    exactly), and an overflow in it skips the step."""
    def run(scaler, poison_step=None):
        model, opt = make("sam")
        for step in range(3):
            data = batch(step)
            calls = []

            def closure():
                calls.append(1)
                loss = loss_of(model, data)
                if step == poison_step and len(calls) == 1:
                    loss = loss * float("inf")
                (scaler.scale(loss) if scaler else loss).backward()
                return loss

            opt.zero_grad()
            if scaler is None:
                opt.step(closure)
            else:
                scaler.step(opt, closure)
                scaler.update()
        return model

    plain = run(None)
    for p, q in zip(plain.parameters(), run(new_scaler(2.0**12)).parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    scaler = new_scaler(2.0**12)
    skipped = run(scaler, poison_step=2)
    assert scaler.get_scale() == 2.0**11
    two_steps, _ = train("sam", 2)  # the reference's form, two steps: the third was skipped
    for p, q in zip(two_steps.parameters(), skipped.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
