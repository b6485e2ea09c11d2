"""Worker processes for tests/integration/test_distributed.py (CPU, gloo): each scenario runs on every rank
and checks its result against a single-process run computed on the same rank."""
from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

import flatfused
from flatfused.distributed import exit_without_teardown

STEPS = 3


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 32)
        self.fc2 = torch.nn.Linear(32, 32)
        self.fc3 = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def full_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)


def local_batch(step, rank, world):
    x, y = full_batch(step)
    n = len(x) // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def fresh_model():
    torch.manual_seed(0)
    return MLP()


def make_optimizer(kind, model, params=None, **kw):
    """``kind``: nso, nso_lam (lam 0.5), sam or wsam, on SGD with momentum; with an ``_adamw``
    suffix on AdamW with weight decay."""
    params = model if params is None else params
    kind, adamw = kind.removesuffix("_adamw"), kind.endswith("_adamw")
    base, base_kw = ((torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)) if adamw else
                     (torch.optim.SGD, dict(lr=0.1, momentum=0.9)))
    if kind.startswith("nso"):
        lam = 0.5 if kind == "nso_lam" else 0.0
        return flatfused.NSO(params, base, sigma=0.05, lam=lam, use_neg=True, num_perturbs=1,
                             seed=11, model=model, **base_kw, **kw)
    if kind == "sam":
        return flatfused.SAM(params, base, rho=0.05, **base_kw, **kw)
    if kind == "wsam":
        return flatfused.WeightedSAM(model, base, rho=0.05, gamma=0.8, **base_kw, **kw)
    raise ValueError(kind)


def train(kind, model, opt, batch_of):
    for step in range(STEPS):
        x, y = batch_of(step)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if kind.startswith("sam"):  # SAM's first pass runs before its step (the reference loop)
            closure()
        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def assert_close(got, want, what):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=what)


def counting_hook(counter):
    def hook(state, bucket):
        counter[0] += 1
        tensor = bucket.buffer()
        work = dist.all_reduce(tensor, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0].div_(dist.get_world_size()))
    return hook


def ddp(model, **kw):
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, bucket_cap_mb=100, **kw)  # one bucket: one all-reduce per synchronised pass


def scenario_ddp_matches_one_process(rank, world):
    for kind in ("nso", "nso_lam", "sam", "wsam"):
        single = fresh_model()
        want = train(kind, single, make_optimizer(kind, single), full_batch)
        model = ddp(fresh_model())
        calls = [0]
        model.register_comm_hook(None, counting_hook(calls))
        got = train(kind, model, make_optimizer(kind, model),
                    lambda s: local_batch(s, rank, world))
        assert_close(got, want, f"DDP {kind} vs one process")
        per_step = {"nso": 1, "nso_lam": 1, "sam": 2, "wsam": 2}[kind]
        assert calls[0] == per_step * STEPS, (kind, calls[0])


def scenario_cheap_schedules_sync_once(rank, world):
    """every=3 (NSO and SAM also with LookSAM-style reuse): DDP equals one process, and a cheap
    step synchronises once; a full step as without a schedule, plus NSO's clean pass with reuse
    (it keeps the averaged clean gradient)."""
    steps = 6  # full steps 0 and 3, cheap 1, 2, 4, 5

    def run(kind, model, opt, batch_of):
        for step in range(steps):
            x, y = batch_of(step)

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss

            if kind.startswith("sam"):
                closure()
            opt.step(closure)
        return [p.detach().clone() for p in model.parameters()]

    for kind, sched, full_syncs in (("nso", dict(every=3), 1), ("nso", dict(every=3, reuse=0.5), 2),
                                    ("sam", dict(every=3), 2), ("sam", dict(every=3, reuse=0.5), 2),
                                    ("wsam", dict(every=3), 2)):
        single = fresh_model()
        want = run(kind, single, make_optimizer(kind, single, **sched), full_batch)
        model = ddp(fresh_model())
        calls = [0]
        model.register_comm_hook(None, counting_hook(calls))
        got = run(kind, model, make_optimizer(kind, model, **sched),
                  lambda s: local_batch(s, rank, world))
        assert_close(got, want, f"DDP {kind} {sched} vs one process")
        assert calls[0] == 2 * full_syncs + 4 * 1, (kind, sched, calls[0])


class Branchy(torch.nn.Module):
    """A head the passes use only when asked (``extra``: e.g. on rank 0 only, or from some step
    on), and one no pass uses."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 16)
        self.head = torch.nn.Linear(16, 4)
        self.extra = torch.nn.Linear(16, 4)
        self.never = torch.nn.Linear(16, 4)

    def forward(self, x, extra: bool):
        h = torch.tanh(self.fc1(x))
        return self.head(h) + self.extra(h) if extra else self.head(h)


def scenario_parameters_without_gradients(rank, world):
    """A parameter no rank computes a gradient for is skipped on every rank (torch's optimizers
    skip it: no weight decay, no moments); one only some ranks compute a gradient for is updated
    on every rank, so the replicas stay identical: under DDP (whose reducer gives it a gradient
    everywhere) and under WSAM's own all-reduce of a plain model (the reference's)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    for kind, wrap in (("nso_adamw", True), ("sam_adamw", True), ("wsam_adamw", True),
                       ("wsam_adamw", False)):
        torch.manual_seed(0)
        module = Branchy()
        never = [p.detach().clone() for p in module.never.parameters()]
        rank0_only = [p.detach().clone() for p in module.extra.parameters()]
        model = DDP(module, find_unused_parameters=True) if wrap else module
        opt = make_optimizer(kind, model)
        for step in range(STEPS):
            x, y = local_batch(step, rank, world)

            def closure():
                loss = F.cross_entropy(model(x, rank == 0), y)
                loss.backward()
                return loss

            opt.zero_grad()
            if kind.startswith("sam"):
                closure()
            opt.step(closure)
        what = f"{kind}, {'DDP' if wrap else 'plain model'}"
        for p, before in zip(module.never.parameters(), never):
            assert p.grad is None and torch.equal(p, before), what
        for p, before in zip(module.extra.parameters(), rank0_only):
            assert not torch.equal(p, before), what
        mine = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine)
        for other in everyone[1:]:
            assert torch.equal(other, everyone[0]), f"replicas differ: {what}"


def scenario_ddp_bucket_views(rank, world):
    """Under ``gradient_as_bucket_view=True`` DDP's reducer replaces each ``.grad`` with a view
    of its bucket holding the average of what ``.grad`` held, the step's earlier passes
    included: gathered back, that is the whole direction, not one more pass to add. Checked
    against one process (MLP), and against DDP without bucket views for parameters that only
    some ranks use in some passes (a rank's locally unused parameter gets the bucket view of
    the others' gradients)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    for kind in ("nso", "nso_lam", "nso_adamw", "sam", "wsam", "wsam_adamw"):
        single = fresh_model()
        want = train(kind, single, make_optimizer(kind, single), full_batch)
        model = ddp(fresh_model(), gradient_as_bucket_view=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the gather's one warning
            got = train(kind, model, make_optimizer(kind, model),
                        lambda s: local_batch(s, rank, world))
        assert_close(got, want, f"DDP gradient_as_bucket_view {kind} vs one process")

        results = []
        for bucket_view in (False, True):
            torch.manual_seed(0)
            module = Branchy()
            model = DDP(module, find_unused_parameters=True, gradient_as_bucket_view=bucket_view)
            opt = make_optimizer(kind, model)
            calls = [0]
            for step in range(STEPS):
                x, y = local_batch(step, rank, world)

                def closure():
                    calls[0] += 1  # the extra head: on one rank per pass, alternating
                    loss = F.cross_entropy(model(x, (calls[0] + rank) % 2 == 0), y)
                    loss.backward()
                    return loss

                opt.zero_grad()
                if kind.startswith("sam"):
                    closure()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    opt.step(closure)
            results.append([p.detach().clone() for p in module.parameters()])
        assert_close(results[1], results[0], f"{kind}: bucket views vs none, unused parameters")


def scenario_reference_nso_all_reduces_every_pass(rank, world):
    from flatfused import reference
    model = ddp(fresh_model())
    calls = [0]
    model.register_comm_hook(None, counting_hook(calls))
    opt = reference.NSM(model.parameters(), torch.optim.SGD, sigma=0.05, lr=0.1, momentum=0.9)
    for step in range(STEPS):
        x, y = local_batch(step, rank, world)
        reference.train_step(model, opt, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y),
                             num_perturbs=1, lam=0.0, use_neg=True)
    assert calls[0] == 3 * STEPS, calls[0]


def train_three_call(kind, model, batch_of):
    """The reference trainer's three-call loop (flatfused.reference.train_step: K=1, two-point,
    lam 0) on flatfused.NSO; returns the model."""
    from flatfused import reference

    opt = make_optimizer(kind, model)
    for step in range(STEPS):
        reference.train_step(model, opt, lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                             batch_of(step), num_perturbs=1, lam=0.0, use_neg=True)
    return model


def scenario_three_call_ddp_matches_one_process(rank, world):
    """The reference's three-call loop on flatfused.NSO under DDP (every pass synchronises, as
    in the reference), with the accumulator copied or the gradient buffer handed over, with
    and without ``gradient_as_bucket_view``."""
    import flatfused.optim.nso_accumulator as nso

    def run(model, batch_of):
        return [p.detach().clone() for p in train_three_call("nso", model, batch_of).parameters()]

    default = nso._HANDOVER_MIN_ELEMENTS_PER_PARAM
    try:
        for threshold in (1 << 60, 0):  # copy, then handover
            nso._HANDOVER_MIN_ELEMENTS_PER_PARAM = threshold
            want = run(fresh_model(), full_batch)
            for bucket_view in (False, True):
                model = ddp(fresh_model(), gradient_as_bucket_view=bucket_view)
                calls = [0]
                model.register_comm_hook(None, counting_hook(calls))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the gather's one warning
                    got = run(model, lambda s: local_batch(s, rank, world))
                assert_close(got, want, f"three-call DDP (handover threshold {threshold}, "
                                        f"gradient_as_bucket_view={bucket_view})")
                assert calls[0] == 3 * STEPS, calls[0]
    finally:
        nso._HANDOVER_MIN_ELEMENTS_PER_PARAM = default


def scenario_per_rank_noise(rank, world):
    model = ddp(fresh_model())
    opt = make_optimizer("nso", model, shared_noise=False)
    train("nso", model, opt, lambda s: local_batch(s, rank, world))
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(world)]
    dist.all_gather(gathered, weights)
    assert all(torch.equal(gathered[0], w) for w in gathered)  # replicas stay identical
    noise = flatfused.noise(64, opt._noise_seed(), 0)
    gathered = [torch.empty_like(noise) for _ in range(world)]
    dist.all_gather(gathered, noise)
    assert not torch.equal(gathered[0], gathered[1])  # but each rank drew its own noise
    shared = make_optimizer("nso", fresh_model())
    assert shared._noise_seed() == shared.seed == 11


def m_sharpness_emulation(world, rho, alpha, lr):
    """One process playing every rank: each ascends with its own gradient; the update averages
    the ranks' mixtures ``alpha g~_r + (1 - alpha) g_r`` (plain SGD)."""
    emulated = fresh_model()
    for step in range(STEPS):
        params = list(emulated.parameters())
        direction = [torch.zeros_like(p) for p in params]
        for r in range(world):
            x, y = local_batch(step, r, world)
            g = torch.autograd.grad(F.cross_entropy(emulated(x), y), params)
            norm = torch.cat([t.reshape(-1) for t in g]).norm()
            with torch.no_grad():
                w = [p.clone() for p in params]
                for p, gi in zip(params, g):
                    p.add_(gi * (rho / (norm + 1e-12)))
            g_pert = torch.autograd.grad(F.cross_entropy(emulated(x), y), params)
            with torch.no_grad():
                for p, wi in zip(params, w):
                    p.copy_(wi)
            for d, gi, gp in zip(direction, g, g_pert):
                d += (alpha * gp + (1 - alpha) * gi) / world
        with torch.no_grad():
            for p, d in zip(params, direction):
                p -= lr * d
    return [p.detach() for p in emulated.parameters()]


def scenario_m_sharpness(rank, world):
    rho, gamma, lr = 0.05, 0.8, 0.1
    model = ddp(fresh_model())
    calls = [0]
    model.register_comm_hook(None, counting_hook(calls))
    opt = flatfused.WeightedSAM(model, torch.optim.SGD, rho=rho, gamma=gamma, lr=lr,
                                decouple=False, m_sharpness=True)
    got = train("wsam", model, opt, lambda s: local_batch(s, rank, world))
    want = m_sharpness_emulation(world, rho, gamma / (1 - gamma), lr)
    assert_close(got, want, "WSAM m-sharpness")
    assert calls[0] == STEPS, calls[0]  # the second pass's all-reduce averages both
    # SAM: the reference recipe, the first pass inside no_sync()
    model = ddp(fresh_model())
    opt = flatfused.SAM(model, torch.optim.SGD, rho=rho, lr=lr)
    for step in range(STEPS):
        x, y = local_batch(step, rank, world)
        opt.zero_grad()
        with model.no_sync():
            F.cross_entropy(model(x), y).backward()
        opt.step(lambda: F.cross_entropy(model(x), y).backward())
    assert_close([p.detach() for p in model.parameters()],
                 m_sharpness_emulation(world, rho, 1.0, lr), "SAM m-sharpness")


def fsdp2(model, **fully_shard_kw):
    """FSDP2 per layer and at the root (``fully_shard_kw``: e.g. a 2-D ``mesh`` for HSDP, an
    ``mp_policy``)."""
    from torch.distributed.fsdp import fully_shard
    for layer in (model.fc1, model.fc2, model.fc3):
        fully_shard(layer, **fully_shard_kw)
    return fully_shard(model, **fully_shard_kw)


def scenario_fsdp2_matches_ddp(rank, world):
    for kind in ("nso", "nso_lam", "sam", "wsam", "nso_adamw", "sam_adamw", "wsam_adamw"):
        model = ddp(fresh_model())
        want = train(kind, model, make_optimizer(kind, model),
                     lambda s: local_batch(s, rank, world))
        model = fsdp2(fresh_model())
        opt = make_optimizer(kind, model)
        assert all(buf.sharded for buf in opt.flat_buffers)
        # The shards take the fused restore + base update, their state DTensor views of it.
        assert opt._base_step.can_fuse(opt.flat_buffers), kind
        train(kind, model, opt, lambda s: local_batch(s, rank, world))
        for p in model.parameters():
            for t in opt.base_optimizer.state[p].values():
                if t.dim():
                    assert type(t) is type(p) and t.placements == p.placements, kind
        got = [p.full_tensor() for p in model.parameters()]
        assert_close(got, want, f"FSDP2 {kind} vs DDP")

    # The reference's three-call loop, every pass reduce-scattering (as in the reference).
    one_process = train_three_call("nso_adamw", fresh_model(), full_batch)
    want = [p.detach() for p in one_process.parameters()]
    model = train_three_call("nso_adamw", fsdp2(fresh_model()),
                             lambda s: local_batch(s, rank, world))
    assert_close([p.full_tensor() for p in model.parameters()], want, "three-call FSDP2")


def scenario_fsdp2_mixed_precision(rank, world):
    """FSDP2 computing in bf16 (MixedPrecisionPolicy, the usual large-run setting; fp32 shards
    and fp32 gradient reduction) runs the fused path and tracks the fp32 FSDP2 run within bf16
    tolerance."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for kind in ("nso_adamw", "sam", "wsam_adamw"):
        model = fsdp2(fresh_model())
        want = train(kind, model, make_optimizer(kind, model),
                     lambda s: local_batch(s, rank, world))
        model = fsdp2(fresh_model(), mp_policy=policy)
        opt = make_optimizer(kind, model)
        assert opt._base_step.can_fuse(opt.flat_buffers), kind
        assert all(buf.dtype == torch.float32 for buf in opt.flat_buffers), kind
        got = train(kind, model, opt, lambda s: local_batch(s, rank, world))
        start = [p.detach() for p in fresh_model().parameters()]
        for g, w, p0 in zip(got, want, start):
            assert torch.isfinite(g.full_tensor()).all(), kind
            # The bf16 run moved the weights as the fp32 one did, up to bf16 rounding (AdamW's
            # normalised steps amplify it for near-zero gradients: up to 8% measured).
            moved, want_moved = g.full_tensor() - p0, w.full_tensor() - p0
            assert (moved - want_moved).norm() < 0.2 * want_moved.norm(), kind


def scenario_fsdp2_parameters_without_gradients(rank, world):
    """Sharded parameters without a gradient are skipped as torch.optim skips them (FSDP2
    leaves their ``.grad`` None): a head no pass uses keeps its weights, with no weight decay,
    and one that joins at the second step starts stepping then; FSDP2 equals DDP, whose skipping
    parameters_without_gradients checks, with ``zero_grad`` keeping or dropping the gradients."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    def run(kind, model, module, set_to_none):
        opt = make_optimizer(kind, model)
        for step in range(STEPS):
            x, y = local_batch(step, rank, world)

            def closure():
                loss = F.cross_entropy(model(x, step > 0), y)
                loss.backward()
                return loss

            opt.zero_grad(set_to_none=set_to_none)
            if kind.startswith("sam"):
                closure()
            opt.step(closure)
        return opt

    for kind in ("nso_adamw", "nso_lam_adamw", "sam_adamw", "wsam_adamw"):
        for set_to_none in (False, True):
            what = f"{kind}, set_to_none={set_to_none}"
            torch.manual_seed(0)
            module = Branchy()
            start = {name: p.detach().clone() for name, p in module.named_parameters()}
            run(kind, DDP(module, find_unused_parameters=True), module, set_to_none)
            want = [p.detach() for p in module.parameters()]
            torch.manual_seed(0)
            module = Branchy()
            for layer in (module.fc1, module.head, module.extra, module.never):
                fully_shard(layer)
            fully_shard(module)
            opt = run(kind, module, module, set_to_none)
            assert all(buf.sharded for buf in opt.flat_buffers), what
            assert opt._base_step.can_fuse(opt.flat_buffers), what
            got = [p.full_tensor() for p in module.parameters()]
            assert_close(got, want, f"FSDP2 vs DDP: {what}")
            for name, p in module.named_parameters():
                moved = not torch.equal(p.full_tensor(), start[name])
                assert moved == (not name.startswith("never")), (what, name)
            assert all(p.grad is None for p in module.never.parameters()), what
            for p in module.never.parameters():
                assert float(opt.base_optimizer.state[p]["step"]) == 0, what
            for p in module.extra.parameters():
                assert float(opt.base_optimizer.state[p]["step"]) == STEPS - 1, what


def scenario_hsdp_matches_ddp(rank, world):
    """HSDP (FSDP2 on a 2-D mesh: replicated across its first dimension, sharded along its
    second): norms over shards sum over the shard groups only, not over the replicas."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    # SAM's ascent and WSAM's divide by the gradient norm; NSO's clipping uses it.
    for kind, kw in (("sam", {}), ("wsam_adamw", {}), ("nso", {"max_grad_norm": 0.5})):
        model = ddp(fresh_model())
        want = train(kind, model, make_optimizer(kind, model, **kw),
                     lambda s: local_batch(s, rank, world))
        model = fsdp2(fresh_model(), mesh=mesh)
        opt = make_optimizer(kind, model, **kw)
        assert all(buf.sharded for buf in opt.flat_buffers)
        train(kind, model, opt, lambda s: local_batch(s, rank, world))
        got = [p.full_tensor() for p in model.parameters()]
        assert_close(got, want, f"HSDP {kind} vs DDP")


def scenario_fsdp2_amp_shard_overflow(rank, world):
    """GradScaler under FSDP2: a gradient that overflows in one element only, which rank 0's
    shard holds after the reduce-scatter, skips the step on every rank (the other rank's
    shards must not move, nor its base-optimizer state) and lowers the scale everywhere."""
    for kind in ("nso", "sam", "wsam_adamw"):
        model = fsdp2(fresh_model())
        opt = make_optimizer(kind, model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100, growth_interval=1000)
        scaler.scale(torch.zeros(()))  # GradScaler creates its scale tensor lazily
        poison = [False]

        def base_state():
            return [v.full_tensor().clone() for p in model.parameters()
                    for v in opt.base_optimizer.state.get(p, {}).values() if v.dim()]

        def loss_fn(x, y):
            loss = F.cross_entropy(model(x), y)
            if poison[0]:  # d/dw of this term overflows fp32 once scaled by 2**100
                loss = loss + 1e10 * model.fc1.weight.full_tensor()[0, 0]
            return loss

        for step in range(STEPS):
            x, y = local_batch(step, rank, world)
            poison[0] = step == 1
            before = [p.full_tensor().clone() for p in model.parameters()]
            state = base_state()
            scale = scaler.get_scale()
            if not kind.startswith("nso"):  # WSAM's first pass adds to earlier gradients
                opt.zero_grad()
            if kind.startswith("sam"):
                scaler.scale(loss_fn(x, y)).backward()
            scaler.step(opt, lambda: scaler.scale(loss_fn(x, y)).backward())
            scaler.update()
            after = [p.full_tensor() for p in model.parameters()]
            moved = any(not torch.equal(a, b) for a, b in zip(before, after))
            if step == 1:
                assert not moved, f"{kind}: a shard moved in an overflowed step"
                assert all(map(torch.equal, base_state(), state)), f"{kind}: base state moved"
                assert scaler.get_scale() == scale / 2, (kind, scaler.get_scale())
            else:
                assert moved and scaler.get_scale() == scale, (kind, step)


def scenario_fsdp2_dcp_resume(rank, world):
    """FSDP2 checkpoints: a run saved after two steps and resumed into a new model and optimizer
    (another seed) continues bit-identically, through torch.distributed.checkpoint and through
    each rank's own ``state_dict()`` and ``torch.save``."""
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def make(seed, base, base_kw):
        model = fsdp2(fresh_model())
        return model, flatfused.NSO(model, base, sigma=0.05, lam=0.0, use_neg=True, seed=seed,
                                    **base_kw)

    def step(model, opt, s):
        x, y = local_batch(s, rank, world)
        opt.step(lambda: F.cross_entropy(model(x), y).backward())

    def through_dcp(model, opt, resumed, resumed_opt, name):
        model_sd, optim_sd = get_state_dict(model, opt)
        path = os.path.join(WORKDIR, name)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        model_sd, optim_sd = get_state_dict(resumed, resumed_opt)
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=path)
        set_state_dict(resumed, resumed_opt, model_state_dict=loaded["model"],
                       optim_state_dict=loaded["optim"])

    def through_torch_save(model, opt, resumed, resumed_opt, name):
        saved = io.BytesIO()
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, saved)
        saved.seek(0)
        loaded = torch.load(saved, weights_only=False)
        resumed.load_state_dict(loaded["model"])
        resumed_opt.load_state_dict(loaded["optim"])

    for base, base_kw in ((torch.optim.AdamW, dict(lr=1e-2)),
                          (torch.optim.SGD, dict(lr=0.1, momentum=0.9))):
        for resume in (through_dcp, through_torch_save):
            model, opt = make(11, base, base_kw)
            for s in range(2):
                step(model, opt, s)
            resumed, resumed_opt = make(99, base, base_kw)
            resume(model, opt, resumed, resumed_opt, f"ckpt_{base.__name__}")
            for s in range(2, 4):
                step(model, opt, s)
                step(resumed, resumed_opt, s)
            for p, q in zip(model.parameters(), resumed.parameters()):
                assert torch.equal(p.full_tensor(), q.full_tensor()), (resume.__name__, base)


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items()
             if name.startswith("scenario_")}


WORKDIR = ""  # the test's temporary directory (the init file's), for checkpoints


def run(rank, world, init_file, names):
    global WORKDIR
    WORKDIR = os.path.dirname(init_file)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        for name in names:
            SCENARIOS[name](rank, world)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_without_teardown()  # every check passed
