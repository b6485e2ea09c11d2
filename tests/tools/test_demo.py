"""``flatfused demo``: the quick configuration end to end (table, trade-off table, JSON, plots,
matched compute), each optimizer's training against its plain-PyTorch statement, the gains-kept
arithmetic, determinism, and refusal of bad input."""
import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

from flatfused import cli, demo, demo_task, reference
from flatfused._progress import ProgressBar
from flatfused.demo_report import MEASURES
from flatfused.demo_tradeoff import kept_gains, tradeoff_table
from flatfused.demo_variants import VARIANTS, budget, full_steps, plan, planned_passes
from flatfused.optim.schedules import Schedule
from flatfused.reference.schedules import ScheduledTrainer

CHEAP = [n for n in demo.OPTIMIZERS if VARIANTS[n].cheap]


def _run(tmp_path, *extra):
    out = tmp_path / "out"
    code = cli.main(["demo", "--quick", "--no-progress", "--out", str(out), *extra])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def _quick_cfg(*extra):
    return demo.config(demo.parser().parse_args(["--quick", *extra]))


def test_quick_run_tables_json_plots_and_matched_compute(tmp_path, capsys):
    out, record = _run(tmp_path)
    text = capsys.readouterr().out
    assert text.startswith("$ flatfused demo --quick")
    cfg = _quick_cfg()
    labels = {n: VARIANTS[n].label(cfg) for n in demo.OPTIMIZERS}
    assert record["labels"] == labels
    header = "| optimizer | " + " | ".join(title for _, title, _, _ in MEASURES) + " |"
    assert header in text
    assert "| optimizer | radius | passes/step | steps (full) | passes |" in text
    for name in demo.OPTIMIZERS:
        assert f"| {labels[name]} | " in text  # a row in each table
        assert text.count(f"| {labels[name]} | ") == 2
    # one verdict line per measure, saying whether the lead exceeds the seed spread (or a tie)
    for _, title, better, _ in MEASURES:
        verdict = [line for line in text.splitlines()
                   if line.startswith(f"{title} ({better} is better): ")]
        assert len(verdict) == 1
        assert "the seed spread" in verdict[0] or verdict[0].endswith(" tie")
    # the radius choice is stated, and each scaled schedule is compared with its twin
    assert "radius: a cheap schedule keeps its full optimizer's (rho 0.4, sigma 0.08)" in text
    scaled = [n for n in demo.OPTIMIZERS if VARIANTS[n].scaled]
    assert len(record["radius_verdicts"]) == len(scaled) == 4
    assert all(f"{labels[n]} against the same radius: " in text for n in scaled)
    assert "no SAM-ON row" in text
    assert "wall time" in text and "load average" in text and "(matched)" in text
    assert (out / "table.md").read_text().strip() in text

    seeds = demo.QUICK["seeds"]
    assert record["seeds"] == list(range(seeds))
    for name in demo.OPTIMIZERS:
        assert [r["seed"] for r in record["results"][name]] == record["seeds"]
        for key, *_ in MEASURES:
            assert all(isinstance(r[key], float) for r in record["results"][name])
            assert set(record["summary"][name][key]) == {"mean", "std"}
    # matched compute, counted: every optimizer made the budget's passes, a cheap schedule
    # to within one full step's extra passes, with more steps than its full optimizer
    total = budget(cfg)
    assert total == 2 * cfg.epochs * math.ceil(cfg.n_train / cfg.batch_size)
    sched = record["schedule"]
    for name in demo.OPTIMIZERS:
        counted = {c["passes"] for c in record["compute"][name]}
        assert counted == {sched[name]["passes"]}
        variant = VARIANTS[name]
        assert total - (variant.full_passes() - 1) <= sched[name]["passes"] <= total
        if variant.cheap:
            assert sched[name]["steps"] > sched[variant.family]["steps"]
            assert 0 < sched[name]["full_steps"] < sched[name]["steps"]
            # the most steps that fit: one more would exceed the budget
            assert planned_passes(variant, cfg, sched[name]["steps"] + 1) > total
    assert record["compute_matched"] is True
    assert sched["sgd"]["steps"] == 2 * sched["sam"]["steps"] == 2 * sched["nso"]["steps"]
    assert sched["nso-every-reuse"]["passes"] == (sched["nso-every-reuse"]["steps"]
                                                  + 2 * sched["nso-every-reuse"]["full_steps"])
    assert set(record["kept"]) == set(CHEAP)

    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in text
    else:
        assert (out / "demo.png").stat().st_size > 0
        assert (out / "tradeoff.png").stat().st_size > 0


@pytest.mark.parametrize("every, window", [(1, None), (5, None), (3, (4, None)), (2, (3, 11)),
                                           (1, (7, None)), (4, (0, 2))])
def test_full_steps_counts_what_the_schedule_decides(every, window):
    schedule = Schedule.build(every=every, window=window)
    for steps in range(0, 25):
        assert full_steps(schedule, steps) == sum(schedule.full_step(t) for t in range(steps))


def _plain(cfg, name, steps, seed, data):
    """``name`` trained by the plain-PyTorch statement: the reference SAM / NSM driven by
    flatfused.reference.schedules over the demo's model, batches and lr schedule, with the
    schedule and radius written out here. Returns the model and the passes that count (the
    reference NSO loop also runs a clean pass on full steps, which lam = 0 weighs 0 and
    flatfused skips unless the reuse needs it)."""
    x, y = data
    variant = VARIANTS[name]
    model = demo_task.make_model(cfg.dim, cfg.width, cfg.classes, seed)
    base = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if variant.family == "sgd":
        opt = torch.optim.SGD(model.parameters(), **base)
    elif variant.family == "sam":
        opt = reference.SAM(model.parameters(), torch.optim.SGD,
                            rho=cfg.rho * (cfg.every if variant.scaled else 1), **base)
    else:
        source = reference.flatfused_noise_source(list(model.parameters()), seed)
        opt = reference.NSM(model.parameters(), torch.optim.SGD, noise_source=source,
                            sigma=cfg.sigma * (math.sqrt(cfg.every) if variant.scaled else 1),
                            **base)
    window = (steps - round(cfg.late * steps), None) if variant.late else None
    schedule = Schedule.build(every=cfg.every if variant.every else 1, window=window,
                              reuse=cfg.reuse if variant.reuse else None)
    passes = 0

    def loss_fn(m, batch):
        nonlocal passes
        passes += 1
        return F.cross_entropy(m(batch[0]), batch[1])

    trainer = None if variant.family == "sgd" else ScheduledTrainer(
        variant.family, model, opt, loss_fn, schedule)
    for t, idx in enumerate(demo_task.batch_order(x.shape[0], cfg.batch_size, steps, seed)):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * t / steps))
        if trainer is None:
            opt.zero_grad()
            loss_fn(model, (x[idx], y[idx])).backward()
            opt.step()
            continue
        if variant.family == "nso" and not variant.reuse and schedule.full_step(t):
            passes -= 1
        trainer.step((x[idx], y[idx]))
    return model, passes


@pytest.mark.parametrize("name", ["sgd", "sam", "nso", "sam-every-reuse", "sam-late",
                                  "sam-every-scaled", "nso-every", "nso-every-reuse-scaled",
                                  "nso-late"])
def test_training_matches_the_plain_pytorch_statement(name):
    cfg = _quick_cfg()
    seed = 1
    x, y, _, _ = demo_task.make_task(cfg.n_train, cfg.n_test, cfg.dim, cfg.classes, 0)
    y_noisy, _ = demo_task.corrupt_labels(y, cfg.label_noise, cfg.classes, seed)
    steps, _ = plan(VARIANTS[name], cfg)
    model, count = demo_task.train(cfg, name, seed, (x, y_noisy), torch.device("cpu"),
                              ProgressBar(1, enable=False))
    plain, passes = _plain(cfg, name, steps, seed, (x, y_noisy))
    assert count.passes == passes == planned_passes(VARIANTS[name], cfg, steps)
    # fp32 throughout: the fused flat-buffer updates round in another order than the
    # reference's per-parameter ones, about one ulp of a weight (|w| < 0.5: 3e-8) per step;
    # over the quick run's <= 24 steps, with momentum carrying a difference on for ~1/(1-0.9)
    # steps, well under 1e-6. A wrong schedule (a full step moved by one, another radius or
    # alpha) moves weights by lr * rho-sized amounts, 1e-4 and more.
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def _result(acc, trace):
    return dict(test_acc=acc, hessian_trace=trace)


def test_gains_kept_are_fractions_of_the_full_optimizers_gain():
    # SGD trace 100, SAM 50: SAM's gain is 50; a cheap run at 75 keeps half, one at 110 keeps
    # -20% (sharper than SGD). Accuracy the same way, higher is better.
    results = {"sgd": [_result(60.0, 100.0), _result(62.0, 100.0)],
               "sam": [_result(80.0, 50.0), _result(82.0, 60.0)],
               "sam-every": [_result(70.0, 75.0), _result(72.0, 110.0)],
               "nso": [_result(60.0, 100.0), _result(62.0, 100.0)],  # no gain over SGD
               "nso-every": [_result(61.0, 90.0), _result(63.0, 90.0)]}
    names = list(results)
    summary = {n: {k: dict(mean=sum(r[k] for r in v) / 2, std=0.0) for k in ("test_acc",
                                                                            "hessian_trace")}
               for n, v in results.items()}
    kept = kept_gains(results, summary, names)
    assert set(kept) == {"sam-every", "nso-every"}
    trace = kept["sam-every"]["hessian_trace"]
    assert trace["mean"] == pytest.approx((100 - 92.5) / (100 - 55))
    assert trace["seeds"] == [pytest.approx(0.5), pytest.approx(-0.25)]
    assert kept["sam-every"]["test_acc"]["seeds"] == [pytest.approx(0.5), pytest.approx(0.5)]
    assert kept["nso-every"]["hessian_trace"] == dict(mean=None, seeds=[None, None])

    cfg = _quick_cfg()
    plans = {n: dict(steps=10, full_steps=2, passes=12) for n in names}
    text = tradeoff_table(cfg, {n: {**summary[n]} for n in names}, names, plans, kept)
    row = next(line for line in text.splitlines() if line.startswith("| SAM every 5 |"))
    assert row.endswith("| 17% (-25 to 50) | 50% (50 to 50) |")
    assert "n/a (no gain to keep)" in next(line for line in text.splitlines()
                                           if line.startswith("| NSO every 5 |"))
    # without SGD there is no gain to measure: no fraction is claimed
    assert kept_gains(results, summary, ["sam", "sam-every"]) == {}


def test_a_subset_without_sgd_runs_and_claims_no_gain(tmp_path, capsys):
    _, record = _run(tmp_path, "--seeds", "1", "--optimizers", "sam,sam-every-reuse",
                     "--no-plot")
    assert record["kept"] == {}
    assert record["compute_matched"] is True
    row = next(line for line in capsys.readouterr().out.splitlines()
               if line.startswith("| SAM every 5 + reuse 0.7 | rho"))
    assert row.endswith("|  |  |")


def test_every_late_and_reuse_options_change_the_schedules(tmp_path):
    _, record = _run(tmp_path, "--seeds", "1", "--optimizers", "sgd,nso,nso-every-reuse,nso-late",
                     "--every", "3", "--late", "0.5", "--reuse", "0.2", "--no-plot")
    sched = record["schedule"]
    assert sched["nso-every-reuse"]["schedule"] == dict(every=3, window=None, reuse=0.2)
    steps = sched["nso-late"]["steps"]
    assert sched["nso-late"]["schedule"]["window"] == [steps - round(0.5 * steps), None]
    assert record["labels"]["nso-every-reuse"] == "NSO every 3 + reuse 0.2"


def test_sgd_match_batch_matches_example_gradients(tmp_path):
    _, record = _run(tmp_path, "--seeds", "1", "--optimizers", "sgd,nso", "--sgd-match", "batch",
                     "--n-train", "250", "--measure-size", "64")
    sgd, nso = record["compute"]["sgd"][0], record["compute"]["nso"][0]
    assert sgd["examples"] == nso["examples"] == 2 * demo.QUICK["epochs"] * 250
    assert record["schedule"]["sgd"]["batch"] == 2 * record["schedule"]["nso"]["batch"]
    assert record["compute_matched"] is True


def test_same_seed_same_numbers(tmp_path):
    args = ("--seeds", "1", "--first-seed", "3", "--no-plot",
            "--optimizers", "sgd,nso,nso-every-reuse,sam-late")
    _, first = _run(tmp_path / "a", *args)
    _, second = _run(tmp_path / "b", *args)
    assert first["results"] == second["results"]
    assert first["results"]["nso"][0]["seed"] == 3


@pytest.mark.parametrize("args", [
    ["--seeds", "0"], ["--label-noise", "1.0"], ["--label-noise", "-0.1"], ["--lr", "0"],
    ["--sigma", "nan"], ["--optimizers", "sgd,adam"], ["--optimizers", "sgd,sgd"],
    ["--optimizers", "sam-every5"], ["--epochs", "two"], ["--sgd-match", "time"],
    ["--every", "1"], ["--every", "2.5"], ["--late", "0"], ["--late", "1"],
    ["--late", "abc"], ["--reuse", "0"], ["--reuse", "inf"], ["--label-noise", "x"],
])
def test_bad_arguments_are_refused(args, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--quick", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--measure-size", "100000"], "exceeds --n-train"),
    (["--sigma", "0"], "--ns-sigma"),
    (["--device", "tpu"], "--device"),
    (["--label-noise", "0.001"], "corrupts no label"),
    (["--late", "0.01"], "no full step"),
])
def test_inconsistent_configuration_is_refused(args, message, tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
