"""The benchmark machinery (flatfused bench) on tiny sizes: the headline and full runs' schema,
the byte model, the STREAM floor and the rule for rows above it, the direct timing of the
optimizer's own work, the peers, the time-left estimate, where results go, state counting.

Timings are not checked (this is not a timed test); docs/benchmarks.md describes the method.
"""
import ast
import gc
import io
import json
import re
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

from flatfused import benchmark as fb
from flatfused.benchmark import contenders as fb_contenders
from flatfused.benchmark import measure as fb_measure

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
BACKENDS = [b for b in ("cpu",) if b in fb.default_backends(torch.device("cpu"))] or ["torch"]
ROW_KEYS = {"optimizer", "base", "dtype", "numel", "contender", "ms_per_step", "optimizer_ms_min",
            "speedup_vs_reference_fastest", "speedup_vs_baseline_fastest",
            "speedup_vs_flatfused", "optimizer_ms_per_step", "backward_ms", "passes",
            "params_per_s", "gb_per_s", "floor_fraction", "floor_note", "floor_bound",
            "state_bytes_per_param", "state_bytes_per_param_beyond_base", "peak_bytes_per_param",
            "floor_ms", "speedup_vs_reference", "speedup_vs_baseline"}
HAS_PYTORCH_OPTIMIZER = fb.peers.package_version("pytorch_optimizer") is not None


def _tiny_model():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2), torch.nn.BatchNorm2d(4),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 15 * 15, 10))


def test_byte_model():
    # NSO K=1 two-point, SGD momentum: zero g 1 + save/perturb 3 + minus 2 + restore/step 6.
    assert fb.budget_accesses("nso", "sgd") == 12
    assert fb.budget_bytes("nso", "sgd", torch.float32) == 48
    assert fb.budget_bytes("nso", "sgd", torch.bfloat16) == 24
    assert fb.budget_accesses("nso-k2", "sgd") == 12 + 2 * 2  # two more perturbations
    assert fb.budget_accesses("nso", "adamw") == 12 + 2  # v read and written
    assert fb.budget_accesses("sam", "sgd") == 1 + 1 + 4 + 1 + 5
    assert fb.budget_accesses("asam", "sgd") == fb.budget_accesses("sam", "sgd") + 1
    # zero g 1 + norm 1 + ascent saving w0 and g0, zeroing g 6 + restore/step/sharpness 4 + m 2
    assert fb.budget_accesses("wsam", "sgd") == 1 + 1 + 6 + 4 + 2
    assert fb.noise_draws("nso") == 1 and fb.noise_draws("nso-k2") == 2
    assert fb.noise_draws("sam") == 0
    # The reference trainer always runs the clean pass; step(closure) skips it for lam == 0.
    assert fb.passes("nso", "reference") == 3 and fb.passes("nso", "flatfused[cpu] 3-call") == 3
    assert fb.passes("nso", "flatfused[cpu]") == 2 and fb.passes("nso", "baseline") == 2
    assert fb.passes("nso-k2", "flatfused[cpu]") == 4 and fb.passes("wsam", "reference") == 2
    # The base step alone: R w, R g, W w + momentum (2) or Adam's moments (4); one pass.
    assert fb.budget_accesses("base", "sgd") == 5 and fb.budget_accesses("base", "adamw") == 7
    assert fb.passes("base", "torch.fused") == 1
    assert fb.passes("sam", "pytorch_optimizer.LookSAM") == 2  # its closure runs every step


def test_floor_is_bytes_at_the_floor_bandwidth_or_normals():
    calib = dict(numel=1 << 20, floor_gb_per_s=10.0, floor_kernel="triad", torch_normal_ms=50.0,
                 flatfused_noise_ms={"cpu": 5.0})
    byte_ms = 48 * (1 << 20) / 10e9 * 1e3  # 5.03 ms: the bytes set NSO's floor, just
    assert fb.floor_ms("nso", "sgd", torch.float32, calib) == pytest.approx(max(byte_ms, 5.0))
    assert fb.floor.floor_bound("nso", "sgd", torch.float32, calib) == "triad"
    assert fb.floor_ms("sam", "sgd", torch.float32, calib) == pytest.approx(
        fb.budget_bytes("sam", "sgd", torch.float32) * (1 << 20) / 10e9 * 1e3)
    slow = dict(calib, flatfused_noise_ms={"cpu": 9.0})  # the fastest generator: 9 ms
    assert fb.floor_ms("nso", "sgd", torch.float32, slow) == 9.0
    assert fb.floor.floor_bound("nso", "sgd", torch.float32, slow) == "normals"
    assert fb.floor_ms("nso-k2", "sgd", torch.float32, slow) == 18.0  # two draws per step


# ---------------------------------------------------------------------------- the STREAM floor


def test_stream_kernels_compute_what_stream_names():
    floor = fb.StreamFloor(1000, torch.device("cpu"), torch.float32)
    expected = {"copy", "scale", "add", "triad"}
    if "cpu" in fb.default_backends(torch.device("cpu")):
        expected.add("copy-nt")
    expected.add("nstream")
    assert set(floor.kernels) == expected
    a, b, c, d = floor.arrays
    # From STREAM's a = 1, b = 2, c = 0, the warm-up round and one more: copy c = a, scale
    # b = 3c, add c = a + b, triad a = b + 3c, nstream d += 3 b c on its own d = 0, then (when
    # there) the streamed copy c = a: a = 15 -> 225, b = 3 -> 45, c = 4 -> 60 (15 -> 225
    # streamed), d = 36 -> 36 + 3 * 45 * 60. Small integers: exact.
    floor.run_round()
    assert (float(a[0]), float(b[0])) == (225.0, 45.0)
    assert float(c[0]) == (225.0 if "copy-nt" in expected else 60.0)
    assert float(d[0]) == 36.0 + 3 * 45 * 60
    assert all(float(t.min()) == float(t.max()) for t in (a, b, c, d))
    assert all(len(t) == 1 for t in floor.seconds.values())  # one timing per kernel and round
    floor.close()


def test_stream_floor_counts_bytes_as_stream_does_and_keeps_the_best_round():
    floor = fb.StreamFloor(1 << 10, torch.device("cpu"), torch.float32)
    floor.seconds = {"copy": [4e-6, 2e-6, 3e-6], "triad": [2.5e-6, 2.6e-6],
                     "copy-nt": [1.8e-6, 1.5e-6]}
    rates = floor.gb_per_s()
    # STREAM's counts, no write-allocate: copy 2 elements x 4 bytes per index, triad 3.
    assert rates["copy"] == pytest.approx(2 * 4 * 1024 / 2e-6 / 1e9)
    assert rates["triad"] == pytest.approx(3 * 4 * 1024 / 2.5e-6 / 1e9)
    summary = floor.summary()
    # The fastest kernel is the floor (5.5 GB/s streamed against triad's 4.9 and copy's 4.1),
    # its resolution the gap between its two best rounds.
    assert summary["floor_kernel"] == "copy-nt"
    assert summary["floor_gb_per_s"] == pytest.approx(2 * 4 * 1024 / 1.5e-6 / 1e9)
    assert summary["floor_resolution"] == pytest.approx(1.8 / 1.5 - 1)
    assert summary["stream_trials"] == {"copy": 3, "triad": 2, "copy-nt": 2}
    floor.close()


def test_streaming_copy_leaves_the_stream_threshold_as_it_was():
    if "cpu" not in fb.default_backends(torch.device("cpu")):
        pytest.skip("no CPU kernels")
    from flatfused import _C

    before = _C.set_cpu_stream_bytes(123 << 20)
    try:
        floor = fb.StreamFloor(4096, torch.device("cpu"), torch.bfloat16)
        floor.run_round()
        assert _C.set_cpu_stream_bytes(123 << 20) == 123 << 20
        floor.close()
    finally:
        _C.set_cpu_stream_bytes(before)


def test_counts():
    assert fb.parse_count("16M") == 16 << 20 and fb.parse_count("4096") == 4096
    assert fb.format_count(64 << 20) == "64M" and fb.format_count(1000) == "1000"


@pytest.fixture(scope="module")
def suite():
    return fb.run_suite([4096], [torch.float32], ["nso", "sam", "wsam", "base"], ["sgd"],
                        backends=BACKENDS, repeats=1, progress=False, log=lambda *a, **k: None)


def test_suite_rows_and_state_counts(suite):
    assert suite["errors"] == []
    rows = {(r["optimizer"], r["contender"]): r for r in suite["results"]}
    for opt in ("nso", "sam", "wsam"):
        assert (opt, "reference") in rows and (opt, "baseline") in rows
    for r in suite["results"]:
        assert ROW_KEYS <= set(r)
        assert r["optimizer_ms_per_step"] > 0 and r["params_per_s"] > 0
        # Every flat-minima contender has a reference and a flatfused row to compare with; the
        # base step alone has neither.
        assert (r["speedup_vs_reference"] is None) == (r["optimizer"] == "base")
        assert r["passes"] == fb.passes(r["optimizer"], r["contender"])
    assert rows[("nso", "reference")]["speedup_vs_reference"] == 1.0
    # State beyond the base optimizer's momentum, fp32: the reference NSO keeps w0, acc and the
    # noise (12 B); flatfused's step(closure) w0 only (4 B) and its three-call API w0 + acc.
    assert rows[("nso", "reference")]["state_bytes_per_param_beyond_base"] == 12
    b = BACKENDS[0]
    assert rows[("nso", f"flatfused[{b}]")]["state_bytes_per_param_beyond_base"] == 4
    assert rows[("nso", f"flatfused[{b}]")]["state_bytes_per_param"] == 8  # + momentum
    assert rows[("nso", f"flatfused[{b}] 3-call")]["state_bytes_per_param_beyond_base"] == 8
    assert rows[("nso", "baseline")]["state_bytes_per_param_beyond_base"] == 8  # A + noise
    assert rows[("sam", "reference")]["state_bytes_per_param_beyond_base"] == 4
    assert rows[("sam", "baseline")]["state_bytes_per_param_beyond_base"] == 4
    assert rows[("wsam", "reference")]["state_bytes_per_param_beyond_base"] == 12
    assert rows[("wsam", "baseline")]["state_bytes_per_param_beyond_base"] == 4
    # The plain base step keeps the momentum buffer and nothing more.
    for peer in ("torch.fused", "torch.foreach"):
        assert rows[("base", peer)]["state_bytes_per_param"] == 4
        assert rows[("base", peer)]["state_bytes_per_param_beyond_base"] == 0
    if HAS_PYTORCH_OPTIMIZER:
        # pytorch_optimizer's SAM keeps its w0 copy in the base optimizer's own state dict: it
        # is told apart by its key, not by the dict. WSAM holds e_w, the clean gradient and the
        # sharpness kept from the step before during its second pass.
        assert rows[("sam", "pytorch_optimizer.SAM")]["state_bytes_per_param_beyond_base"] == 4
        assert rows[("wsam", "pytorch_optimizer.WSAM")]["state_bytes_per_param_beyond_base"] \
            == 12
    for r in suite["results"]:
        assert r["state_param_copies_beyond_base"] == r["state_bytes_per_param_beyond_base"] / 4
    (calib,) = suite["calibration"]
    assert calib["threads"] == torch.get_num_threads()
    assert calib["floor_gb_per_s"] == max(calib["stream_gb_per_s"].values())
    assert calib["torch_normal_ms"] > 0
    # The floor's kernels ran in the calibration's 5 rounds and in each timed round (one per
    # configuration here), and the leading one once more beside every timed step.
    steps = len(suite["results"])
    trials = calib["stream_trials"]
    assert min(trials.values()) == 5 + 4
    assert sum(trials.values()) == len(trials) * (5 + 4) + steps


def test_every_row_is_within_its_floor_or_says_why(suite):
    (calib,) = suite["calibration"]
    for r in suite["results"]:
        dtype = fb.DTYPES[r["dtype"]]
        assert r["floor_ms"] == fb.floor_ms(r["optimizer"], r["base"], dtype, calib)
        # STREAM's rule on both sides: the floor at its kernel's best trial against the row's
        # fastest step.
        assert r["floor_fraction"] == pytest.approx(r["floor_ms"] / r["optimizer_ms_min"])
        assert (r["floor_note"] is None) == (r["floor_fraction"] <= 1.0)
        assert r["floor_note"] in (None, *fb.FLOOR_NOTES)


def _row(fraction, numel=1 << 24, dtype="float32", base="sgd"):
    return dict(optimizer="sam", base=base, dtype=dtype, numel=numel, contender="flatfused[cpu]",
                floor_fraction=fraction)


def test_a_row_above_its_floor_is_explained_or_flagged():
    calib = dict(floor_resolution=0.05)
    llc = 32 << 20
    assert fb.floor_note(_row(0.97), calib, llc) is None
    assert fb.floor_note(_row(1.0), calib, llc) is None
    # 16M fp32 with SGD: w, w0, g and the momentum, 256 MiB, far past a 32 MiB cache. The
    # floor's resolution (its two fastest trials' gap, at least 2%) allows for noise.
    assert fb.floor_note(_row(1.04), calib, llc) == "resolution"
    assert fb.floor_note(_row(1.04), dict(floor_resolution=None), llc) == "unexplained"
    assert fb.floor_note(_row(1.015), dict(floor_resolution=None), llc) == "resolution"
    assert fb.floor_note(_row(1.24), calib, llc) == "unexplained"
    # The row's own resolution (its two fastest steps' gap) adds to the floor's.
    assert fb.floor_note(dict(_row(1.24), optimizer_resolution=0.2), calib, llc) == "resolution"
    assert fb.floor_note(dict(_row(1.08), optimizer_resolution=0.01), calib, llc) \
        == "unexplained"
    # 64K fp32: 1 MiB of arrays, inside the cache.
    assert fb.floor_note(_row(1.24, numel=1 << 16), calib, llc) == "cache"
    assert fb.floor_note(_row(1.24, numel=1 << 16), calib, None) == "unexplained"
    # A peer computing another update: the configuration's byte model does not count its work.
    looksam = dict(_row(1.5), contender="pytorch_optimizer.LookSAM")
    assert fb.floor_note(looksam, calib, llc) == "other update"
    assert fb.floor_note(dict(looksam, floor_fraction=0.5), calib, llc) is None


def test_the_tables_show_a_row_above_its_floor_with_its_explanation():
    rows = [dict(_row(1.31), floor_note="unexplained", contender="flatfused[cpu]",
                 floor_bound="copy-nt"),
            dict(_row(0.62), floor_note=None, contender="baseline", floor_bound="normals")]
    for r in rows:
        r.update(passes=2, optimizer_ms_per_step=10.0, optimizer_ms_min=9.0,
                 speedup_vs_reference=None, speedup_vs_baseline=None, speedup_vs_flatfused=1.0,
                 state_bytes_per_param_beyond_base=4.0)
    text = fb.headline_table(dict(results=rows), 1 << 24)
    assert "| 131% of copy-nt (unexplained) |" in text and "| 62% of normals |" in text
    assert f"- (unexplained) {fb.FLOOR_NOTES['unexplained']}" in text
    assert "(resolution)" not in text and "(cache)" not in text


def test_the_optimizers_own_time_leaves_out_exactly_the_passes(monkeypatch):
    """A pass that takes 7 s on a clock that nothing else moves: the step's own time is none
    of it, whatever the pass cost, and the step's whole time is all of it."""
    clock = [100.0]
    monkeypatch.setattr(fb_contenders.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(fb_measure.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(fb_contenders, "add_through_autograd",
                        lambda leaves, grads: clock.__setitem__(0, clock[0] + 7.0))
    master = fb.make_params(4096, "cpu", torch.float32, pieces=4)
    calib = dict(numel=4096, dtype="float32")
    rows = fb.measure_group(["reference", f"flatfused[{BACKENDS[0]}]"], "nso", "sgd", 4096,
                            torch.device("cpu"), torch.float32, master, master, calib, repeats=2,
                            memory=False)
    passes = {"reference": 3, f"flatfused[{BACKENDS[0]}]": 2}
    for r in rows:
        assert r["passes"] == passes[r["contender"]]
        assert r["ms_per_step"] == r["backward_ms"] == 7000.0 * r["passes"]
        assert r["optimizer_ms_per_step"] == r["optimizer_ms_min"] == pytest.approx(1e-6)


def test_peers_run_beside_flatfused_or_say_why_not(suite):
    ran = {(r["optimizer"], r["contender"]) for r in suite["results"]}
    missing = {(r["optimizer"], r["contender"]): r["reason"] for r in suite["unavailable"]}
    for opt in ("sam", "wsam", "base"):
        for peer in fb.OPTIMIZERS[opt]["peers"]:
            assert ((opt, peer) in ran) != ((opt, peer) in missing)
    assert ("base", "torch.foreach") in ran and ("base", "torch.fused") in ran
    assert (("sam", "pytorch_optimizer.SAM") in ran) == HAS_PYTORCH_OPTIMIZER


def test_a_missing_peer_package_is_listed_with_the_reason(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)  # import fails
    out = fb.run_suite([4096], [torch.float32], ["wsam"], ["sgd"], backends=BACKENDS, repeats=1,
                       progress=False, log=lambda *a, **k: None)
    assert out["unavailable"] == [dict(
        optimizer="wsam", base="sgd", dtype="float32", numel=4096,
        contender="pytorch_optimizer.WSAM",
        reason="pytorch_optimizer is not installed (pip install pytorch_optimizer)")]
    assert "pytorch_optimizer.WSAM" not in {r["contender"] for r in out["results"]}
    assert ("| wsam / sgd | pytorch_optimizer.WSAM | unavailable: pytorch_optimizer is not "
            "installed") in fb.headline_table(out, 4096)
    assert fb.e2e.e2e_unavailable_reason("sam pytorch_optimizer.SAM", "cpu").startswith(
        "pytorch_optimizer is not installed")


def test_a_configuration_option_only_flatfused_takes_leaves_the_others_out(monkeypatch):
    # How a cheap schedule joins the benchmark: one OPTIMIZERS entry with its options.
    monkeypatch.setitem(fb.OPTIMIZERS, "sam-cheap", dict(kind="sam", adaptive=False,
                                                         options=dict(every=5)))
    plan = fb.plan_suite([4096], [torch.float32], ["sam-cheap"], ["sgd"], BACKENDS,
                         torch.device("cpu"), 1)
    (work,) = plan
    assert work.contenders == [f"flatfused[{b}]" for b in BACKENDS]
    assert work.unavailable == {"reference": "reference has no ['every']",
                                "baseline": "baseline has no ['every']"}
    with pytest.raises(NotImplementedError, match="byte model"):
        fb.budget_accesses("sam-cheap", "sgd")


@pytest.mark.skipif(not HAS_PYTORCH_OPTIMIZER, reason="pytorch_optimizer is not installed")
@pytest.mark.parametrize("ours, peer", [("sam flatfused", "sam pytorch_optimizer.SAM"),
                                        ("wsam flatfused", "wsam pytorch_optimizer.WSAM")])
def test_peers_driven_as_documented_compute_flatfuseds_update(ours, peer):
    """End to end on a small model without BatchNorm: after three steps from the same weights
    and batch, the peer's weights are flatfused's. Each weight is formed by a few dozen fp32
    operations on values of order one, each rounding by at most 2**-24 relative, and the two
    sum the gradient norm in different orders: a few times 1e-6, absolute."""
    torch.manual_seed(0)
    state = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 10)).state_dict()
    batch = (torch.randn(8, 3, 32, 32)[:, :1, :2, :3].reshape(8, 6), torch.randint(0, 10, (8,)))
    out = {}
    for contender in (ours, peer):
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                    torch.nn.Linear(16, 10))
        model.load_state_dict(state)
        _, step = fb.e2e_step(contender, model, batch, "auto")
        for _ in range(3):
            step()
        out[contender] = torch.cat([p.detach().flatten() for p in model.parameters()])
    moved = (out[ours] - torch.cat([t.flatten() for t in state.values()])).abs().max()
    assert moved > 1e-3  # the steps moved the weights: the comparison is not vacuous
    torch.testing.assert_close(out[peer], out[ours], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- the command


def test_cli_writes_json_and_tables(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(fb.MODELS, "tiny", _tiny_model)
    out = tmp_path / "r.json"
    assert fb.main(["--full", "--sizes", "4K", "--dtypes", "float32,bfloat16", "--bases",
                    "adamw", "--optimizers", "nso,asam", "--backends", BACKENDS[0], "--repeats",
                    "1", "--models", "tiny", "--batch", "2,3", "--output", str(out),
                    "--no-progress", "--no-plot"]) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "flatfused-suite" and report["schema"] == fb.SCHEMA_VERSION
    assert report["settings"]["mode"] == "full"
    assert {"cpu", "torch", "threads", "load_average_before", "busy", "allocator_env",
            "last_level_cache_bytes", "pytorch_optimizer"} <= set(report["machine"])
    assert report["machine"]["allocator_tuned"] is False
    assert {r["dtype"] for r in report["results"]} == {"float32", "bfloat16"}
    assert len(report["calibration"]) == 2
    e2e = {(r["contender"], r["batch"]): r for r in report["e2e"]}
    for batch in (2, 3):  # each batch size against the AdamW step at that size
        assert e2e[("adamw", batch)]["ratio_vs_adamw"] == 1.0
        nso = e2e[("nso flatfused", batch)]
        assert nso["ratio_vs_adamw"] == nso["ms_per_step"] / e2e[("adamw", batch)]["ms_per_step"]
        rounds = zip(nso["ms_per_round"], e2e[("adamw", batch)]["ms_per_round"])
        assert nso["ratio_vs_adamw_paired"] == pytest.approx(statistics.median(t / b for t, b in rounds))
        assert {f"{c} batch {batch}" for c in ("nso reference", "nso baseline", "sam flatfused")} \
            <= {f"{c} batch {b}" for c, b in e2e}
        assert any(f"tiny batch {batch}: NSO step / AdamW step" in t["target"]
                   for t in report["targets"])
    assert {c for c, _ in e2e} | {r["contender"] for r in report["e2e_unavailable"]} \
        == set(fb.E2E_CONTENDERS)
    assert report["settings"]["e2e_batches"] == [2, 3]
    assert all(r["page_faults_per_step"] >= 0 for r in report["e2e"])
    printed = capsys.readouterr().out
    assert "page faults/step |" in printed
    assert "| nso | adamw | float32 | 4K | reference |" in printed
    assert "summary at 4K float32" in printed
    assert fb.main(["--from-json", str(out), "--full", "--dtypes", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    assert "| nso | adamw | bfloat16" in printed and "| nso | adamw | float32" not in printed
    assert fb.main(["--from-json", str(out), "--numel", "4K"]) == 0
    printed = capsys.readouterr().out
    assert "| nso / adamw |" in printed and "| target | measured |" in printed
    assert "gradient syncs per step" not in printed  # no DDP run saved: no empty table


def test_the_default_run_is_the_headline(tmp_path, capsys, monkeypatch):
    """No --full: each headline optimizer over SGD at one size in fp32 against every
    contender, the base step alone, the floor, and one model end to end against AdamW."""
    monkeypatch.setitem(fb.MODELS, "tiny", _tiny_model)
    monkeypatch.setitem(fb.HEADLINE, "models", ["tiny"])
    monkeypatch.setitem(fb.HEADLINE, "batches", [2])
    monkeypatch.setitem(fb.HEADLINE, "sizes", {"cpu": ["4K"]})
    monkeypatch.setitem(fb.HEADLINE, "repeats", 1)
    monkeypatch.setitem(fb.HEADLINE, "e2e_repeats", 2)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert fb.main(["--backends", BACKENDS[0], "--no-progress", "--no-plot"]) == 0
    (out,) = (tmp_path / "cache" / "flatfused" / "bench").iterdir()
    assert re.fullmatch(r"headline_cpu_[A-Za-z0-9.-]+\.json", out.name)
    report = json.loads(out.read_text())
    settings = report["settings"]
    assert settings["mode"] == "headline"
    assert (settings["sizes"], settings["dtypes"], settings["bases"]) == ([4096], ["float32"],
                                                                          ["sgd"])
    assert settings["optimizers"] == ["nso", "sam", "wsam", "base"] == fb.HEADLINE["optimizers"]
    assert (settings["repeats"], settings["e2e_repeats"]) == (1, 2)
    ran = {(r["optimizer"], r["contender"]) for r in report["results"]}
    listed = {(r["optimizer"], r["contender"]) for r in report["unavailable"] + report["errors"]}
    for opt in settings["optimizers"]:
        expected = fb.contenders_for(opt, BACKENDS, 4096, True, headline=True)
        assert {(opt, c) for c in expected} == {k for k in ran | listed if k[0] == opt}
    assert not any(c.endswith("3-call") for _, c in ran)  # the full suite's only
    assert all(r["peak_bytes_per_param"] is None for r in report["results"])
    assert all(r["repeats"] == 1 for r in report["results"])
    e2e = {r["contender"] for r in report["e2e"]} | {r["contender"]
                                                    for r in report["e2e_unavailable"]}
    assert e2e == set(fb.HEADLINE_E2E_CONTENDERS)
    assert {r["model"] for r in report["e2e"]} == {"tiny"}
    assert all(r["repeats"] == 2 for r in report["e2e"])
    printed = capsys.readouterr().out
    assert "optimizer-only ms per step at 4K float32" in printed
    assert "| optimizer / base | contender | passes |" in printed
    assert "| base / sgd | torch.fused | 1 |" in printed
    assert "copy-nt GB/s" in printed
    assert "| tiny | " in printed
    assert f"wrote {out}" in printed
    assert fb.main(["--from-json", str(out), "--numel", "4K"]) == 0
    assert "| nso / sgd | reference | 3 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, expected", [
    ([], dict(mode="headline", sizes=[16 << 20], dtypes=["float32"], bases=["sgd"],
              optimizers=["nso", "sam", "wsam", "base"], repeats=3, e2e_repeats=5,
              models=["resnet18"], e2e_batches=[32])),
    (["--full"], dict(mode="full", sizes=[1 << 20, 4 << 20, 16 << 20, 64 << 20],
                      dtypes=["float32", "bfloat16"], bases=["sgd", "adamw"],
                      optimizers=list(fb.OPTIMIZERS), repeats=None, e2e_repeats=10,
                      models=["resnet18", "vit"], e2e_batches=[32, 128])),
    (["--quick"], dict(mode="full", sizes=[1 << 20, 4 << 20], dtypes=["float32"], bases=["sgd"],
                       optimizers=list(fb.OPTIMIZERS), repeats=3, e2e_repeats=3,
                       models=["resnet18", "vit"], e2e_batches=[8])),
    (["--numel", "4M", "--optimizers", "sam", "--repeats", "7"],
     dict(mode="headline", sizes=[4 << 20], optimizers=["sam"], repeats=7, e2e_repeats=7)),
    (["--full", "--numel", "16M", "--bases", "adamw"],
     dict(mode="full", sizes=[16 << 20], bases=["adamw"], dtypes=["float32", "bfloat16"])),
])
def test_what_each_mode_measures(argv, expected):
    """The default run is the headline; --full is the whole suite (the default before it);
    --quick the whole suite made small; every option replaces its part of either."""
    chosen = fb.cli._settings(fb.cli._parser().parse_args(argv), torch.device("cpu"))
    assert {k: chosen[k] for k in expected} == expected
    assert chosen["e2e_contenders"] == (fb.E2E_CONTENDERS if chosen["mode"] == "full"
                                        else fb.HEADLINE_E2E_CONTENDERS)


def test_results_go_outside_the_source_tree_under_a_clean_name(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    machine = dict(cpu="Intel(R) Xeon(R) CPU @ 2.20GHz", gpu=None)
    path = fb.default_output(torch.device("cpu"), machine, "headline")
    assert path == tmp_path / ".cache" / "flatfused" / "bench" / "headline_cpu_Intel-Xeon.json"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fb.default_output(torch.device("cuda"), dict(cpu="x", gpu="NVIDIA H200"), "suite") \
        == tmp_path / "xdg" / "flatfused" / "bench" / "suite_cuda_NVIDIA-H200.json"
    repo = Path(__file__).resolve().parents[2]
    assert repo not in fb.default_output(torch.device("cpu"), machine).parents
    for name, expected in [("AMD EPYC", "AMD-EPYC"),
                           ("13th Gen Intel(R) Core(TM) i7-1365U", "13th-Gen-Intel-Core-i7-1365U"),
                           ("AMD Ryzen 9 7950X 16-Core Processor", "AMD-Ryzen-9-7950X-16-Core"),
                           ("Apple M2 Pro", "Apple-M2-Pro"), ("", "unknown"), ("(R)", "unknown")]:
        assert fb.slug(name) == expected


def test_the_progress_line_estimates_the_time_left_from_the_work_done():
    clock = [0.0]
    stream = io.StringIO()
    bar = fb.Progress([("calibration", 1.0), ("nso", 3.0), ("sam", 4.0)], stream=stream,
                      clock=lambda: clock[0], log_every=0.0)
    assert bar.seconds_left() == 8.0  # nothing done: the estimates as they are
    bar.begin()
    clock[0] = 2.0  # the first item took twice its estimate: so will the rest
    bar.end()
    assert bar.scale() == 2.0 and bar.seconds_left() == 14.0
    assert bar.fraction_done() == pytest.approx(1 / 8)
    bar.begin("nso 16M")
    clock[0] = 5.0  # 3 s into an item estimated at 6: 3 s of it and 8 s of the next left
    assert bar.seconds_left() == 11.0
    assert "nso 16M" in bar.line() and "~  11 s left" in bar.line()
    bar.end()
    bar.begin()
    clock[0] = 30.0  # past every estimate: nothing left, never a negative time
    assert bar.seconds_left() == 0.0
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 6 and "\r" not in stream.getvalue()  # a log: whole lines, no redraws
    assert lines[-1].startswith("[####################] 100%")
    # Each kind of work is rescaled by its own finished items once it has some (a loaded
    # machine slows whole training steps more than the optimizer's loops).
    clock[0] = 0.0
    bar = fb.Progress([("e2e warm-up", 1.0, "e2e"), ("e2e round", 1.0, "e2e"),
                       ("floor", 2.0, "suite"), ("nso", 2.0, "suite")], enabled=False,
                      clock=lambda: clock[0])
    bar.begin()
    clock[0] = 3.0
    bar.end()  # e2e: 3x its estimate; the suite, none finished yet, goes by that too
    assert bar.seconds_left() == 3.0 + 12.0
    bar.begin()
    clock[0] = 6.0
    bar.begin()  # starting the next item ends the one before
    clock[0] = 7.0
    bar.end()  # the suite's own: half its estimate
    assert (bar.scale("e2e"), bar.scale("suite")) == (3.0, 0.5)
    assert bar.seconds_left() == 1.0
    quiet = io.StringIO()
    off = fb.Progress([("a", 1.0)], enabled=False, stream=quiet)
    off.begin()
    off.close()
    assert quiet.getvalue() == ""


@pytest.mark.parametrize("load, cores, default, threads", [
    (None, 2, 2, 2), (0.4, 2, 2, 2), (0.8, 2, 2, 1), (5.4, 2, 2, 1), (8.0, 16, 16, 8),
    (40.0, 16, 16, 1), (3.0, 2, 1, 1), (2.0, 16, 4, 4)])
def test_threads_leave_out_the_cores_other_work_keeps_busy(load, cores, default, threads):
    assert fb.cli.threads_for_load(load, cores, default) == threads


def test_the_run_follows_the_plan_its_estimate_is_made_of(suite):
    """The command's progress line is planned before measuring (plan_suite, e2e_estimates):
    the run must take its items one for one, or the time left would drift."""
    plan = fb.plan_suite([4096], [torch.float32], ["nso", "sam"], ["sgd"], BACKENDS,
                         torch.device("cpu"), 1)
    items = fb.suite.suite_estimates(plan)
    bar = fb.Progress(items, enabled=False)
    fb.run_suite([4096], [torch.float32], ["nso", "sam"], ["sgd"], backends=BACKENDS, repeats=1,
                 log=lambda *a, **k: None, bar=bar)
    assert bar.next == len(items) == 3 and bar.current is None
    e2e_items = fb.e2e.e2e_estimates(["tiny"], 2, 2, ["adamw", "nso flatfused"])
    assert [item[0] for item in e2e_items] == ["tiny batch 2 warm-up", "tiny batch 2 round 1/2",
                                              "tiny batch 2 round 2/2"]
    assert {item[2] for item in e2e_items} == {"e2e"} and {item[2] for item in items} == {"suite"}


def test_the_benchmark_package_has_no_import_cycle():
    """Each module of flatfused/benchmark imports its siblings in one direction only (the DDP
    part, once flatfused/bench_ddp.py, lives inside it and imports what it needs directly)."""
    package = Path(fb.__file__).parent
    assert not (package.parent / "bench_ddp.py").exists()
    graph = {}
    for path in package.glob("*.py"):
        name = path.stem
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    graph[name].add(node.module.split(".")[0])
                elif node.level == 1:
                    graph[name] |= {a.name for a in node.names}
                elif node.module and node.module.startswith("flatfused.benchmark"):
                    graph[name].add(node.module.split(".")[2] if node.module.count(".") > 1
                                    else "__init__")
                elif node.module in ("flatfused", "flatfused.bench_ddp"):
                    assert not {a.name for a in node.names} & {"benchmark", "bench_ddp"}, name
    graph.pop("__init__")  # the package's face imports everything; nothing imports it
    assert all("__init__" not in deps for deps in graph.values())
    state = {}

    def visit(node, trail):
        if state.get(node) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(trail + [node])}")
        if state.get(node) == "done" or node not in graph:
            return
        state[node] = "open"
        for dep in graph[node]:
            visit(dep, trail + [node])
        state[node] = "done"
    for node in graph:
        visit(node, [])


def test_gpu_bandwidth_target_names_the_slowest_fused_step_per_backend_and_dtype():
    def row(optimizer, contender, numel, dtype, fraction):
        return dict(optimizer=optimizer, base="sgd", contender=contender, numel=numel, dtype=dtype,
                    floor_fraction=fraction, state_param_copies_beyond_base=1.0)
    big = 64 << 20
    results = [row("nso", "flatfused[cuda]", big, "float32", 0.91),
               row("sam", "flatfused[cuda]", 256 << 20, "float32", 0.78),  # the slowest
               row("nso", "flatfused[cuda] 3-call", big, "float32", 0.10),  # not a fused step
               row("nso", "flatfused[cuda]", 16 << 20, "float32", 0.10),  # below 64M
               row("nso", "baseline", big, "float32", 0.10),
               row("nso", "flatfused[triton]", big, "bfloat16", 0.85),
               row("nso", "flatfused[cuda]", big, "float16", 0.10)]  # not a target dtype
    report = dict(device="cuda", machine={"gpu": "NVIDIA H200"}, results=results)
    targets = {t["target"]: t for t in fb.check_targets(report) if "of the floor" in t["target"]}
    assert len(targets) == 2
    fp32 = targets["NVIDIA H200 64M+ float32 flatfused[cuda] steps: lowest share of the floor "
                   "(sam/sgd at 256M)"]
    assert fp32["measured"] == 0.78 and not fp32["met"]
    bf16 = targets["NVIDIA H200 64M+ bfloat16 flatfused[triton] steps: lowest share of the "
                   "floor (nso/sgd at 64M)"]
    assert bf16["met"]
    # A CPU run has no GPU target, whatever its rows.
    assert not [t for t in fb.check_targets(dict(report, device="cpu"))
                if "of the floor" in t["target"]]
    # A saved schema-2 run's rows have the share of the copy bandwidth instead.
    old = [dict(r, copy_fraction=r.pop("floor_fraction")) for r in results]
    assert [t["measured"] for t in fb.check_targets(dict(report, results=old))
            if "of the floor" in t["target"]] == [0.78, 0.85]


def test_plot(tmp_path, suite):
    pytest.importorskip("matplotlib")
    # One size (the headline): each contender against its floor; several: speedup vs size.
    path = fb.plot(dict(results=suite["results"], machine={"cpu": "test"}), tmp_path / "p.png")
    assert path.exists() and path.stat().st_size > 0
    sizes = suite["results"] + [dict(r, numel=8192) for r in suite["results"]]
    path = fb.plot(dict(results=sizes, machine={"cpu": "test"}), tmp_path / "q.png")
    assert path.exists() and path.stat().st_size > 0
    assert fb.plot(dict(results=[], machine={}), tmp_path / "r.png") is None


def test_peak_memory_sees_an_allocation():
    # No garbage of earlier tests left to be freed inside the window, which would offset it.
    gc.collect()
    with fb.PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(1 << 22)  # 16 MiB, alive long enough for the sampling thread
        time.sleep(0.02)
        del x
    if mem.bytes is None:
        pytest.skip("no malloc statistics on this platform")
    # The peak is the tensor's 16 MiB less whatever other objects (Python's) freed meanwhile:
    # kilobytes (65 KB less was seen once), so 1 MiB of slack still proves the 16 MiB was seen,
    # and a missed tensor (a peak near 0) still fails.
    assert mem.bytes >= (16 << 20) - (1 << 20)


def test_summarize_runs_gives_the_spread_of_each_target(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "summarize_runs", Path(__file__).resolve().parents[2] / "bench" / "summarize_runs.py")
    summarize_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize_runs)
    paths = []
    for i, (ratio, copy_ms) in enumerate([(6.0, 2.5), (8.0, 1.3), (7.0, 2.0)]):
        report = dict(started=f"run{i}", machine={"load_average_before": [1.0, 1.0, 1.0]},
                      calibration=[dict(numel=16 << 20, dtype="float32", copy_ms=copy_ms)],
                      targets=[dict(target="t", measured=ratio)])
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(report))
    out = tmp_path / "summary.json"
    assert summarize_runs.main([str(p) for p in paths] + ["--output", str(out)]) == 0
    spread = json.loads(out.read_text())["spread"]
    assert spread["t"] == dict(min=6.0, median=7.0, max=8.0, runs=3)
    assert spread["copy_16m_fp32_ms"]["median"] == 2.0
    assert "| t | 6.00 | 7.00 | 8.00 | 3 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        summarize_runs.main([str(tmp_path / "missing.json")])


def test_ddp_end_to_end_counts_the_gradient_syncs():
    """Two CPU ranks (gloo): the reference's trainer synchronises in each of its 3 passes,
    flatfused's step(closure) once, as AdamW does."""
    from flatfused.benchmark import ddp as bench_ddp

    rows = {r["contender"]: r for r in bench_ddp.run_e2e_ddp(["vit"], ranks=2, batch_size=2,
                                                             repeats=1)}
    assert set(rows) == set(bench_ddp.DDP_CONTENDERS)
    assert rows["adamw"]["syncs_per_step"] == 1 and rows["adamw"]["ratio_vs_adamw"] == 1
    assert rows["nso reference"]["syncs_per_step"] == 3
    assert rows["nso flatfused"]["syncs_per_step"] == 1
    assert all(r["ms_per_step"] > 0 and r["ranks"] == 2 for r in rows.values())
    table = bench_ddp.e2e_ddp_table({"e2e_ddp": list(rows.values())})
    assert "| vit | 2.7M | 2 | 2 | nso reference |" in table
    with pytest.raises(ValueError, match="2 ranks"):
        bench_ddp.run_e2e_ddp(["vit"], ranks=1)
    with pytest.raises(SystemExit, match="ddp-ranks"):
        fb.main(["--e2e", "--ddp-ranks", "1"])


@pytest.mark.parametrize("device, message", [
    ("cuda", None), ("meta", "runs on cpu or cuda"), ("nonsense", "--device")])
def test_cli_refuses_devices_it_cannot_run_on(device, message):
    if device == "cuda":
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is available")
        message = "no CUDA device is available"
    with pytest.raises(SystemExit, match=message):
        fb.main(["--device", device, "--no-progress"])


@pytest.mark.parametrize("batch", ["0", "32,-1", "x", "2.5", ","])
def test_cli_refuses_bad_batch_sizes(batch):
    with pytest.raises(SystemExit, match="--batch takes comma-separated positive integers"):
        fb.main(["--e2e", "--batch", batch, "--no-progress"])


@pytest.mark.parametrize("args, message", [
    (["--sizes", "12Q"], "--sizes takes comma-separated parameter counts"),
    (["--sizes", "0"], "--sizes takes comma-separated parameter counts"),
    (["--numel", "abc"], "--numel takes comma-separated parameter counts"),
    (["--backends", "bogus"], "--backends: unknown \\['bogus'\\]"),
    (["--backends", "cuda"], "--backends cuda: the 'cuda' backend runs on CUDA tensors"),
    (["--models", "vgg"], "--models: unknown \\['vgg'\\]"),
    (["--optimizers", "adam"], "--optimizers: unknown \\['adam'\\]"),
    (["--models", ","], "--models: give at least one of \\['resnet18', 'vit'\\]"),
    (["--optimizers", " , "], "--optimizers: give at least one of"),
    (["--dtypes", ","], "--dtypes: give at least one of"),
    (["--bases", ","], "--bases: give at least one of"),
    (["--backends", ","], "--backends: give at least one of"),
    (["--optimizers", "nso,sam,nso"], "--optimizers: \\['nso'\\] given more than once"),
    (["--dtypes", "float32,float32", "--quick"], "--dtypes: \\['float32'\\] given more than"),
    (["--sizes", "1M,4M,1048576"], "--sizes: a value is given more than once"),
    (["--batch", "8,8"], "--batch: a value is given more than once"),
    (["--from-json", "/no/such/run.json"], "--from-json /no/such/run.json"),
    (["--from-json", str(RESULTS / "suite_cpu_AMD-EPYC.json"), "--dtypes", ","],
     "--dtypes: give at least one of"),
    (["--from-json", str(RESULTS / "suite_cpu_AMD-EPYC.json"), "--full", "--bases", "sgd,sgd"],
     "--bases: \\['sgd'\\] given more than once"),
])
def test_cli_refuses_bad_values_before_measuring(args, message):
    with pytest.raises(SystemExit, match=message):
        fb.main([*args, "--no-e2e", "--no-progress", "--output", "/dev/null"])


@pytest.mark.parametrize("flag", ["--repeats", "--threads"])
@pytest.mark.parametrize("value", ["-1", "0"])
def test_cli_refuses_bad_repeats_and_threads(capsys, flag, value):
    with pytest.raises(SystemExit):
        fb.main([flag, value, "--no-progress"])
    assert f"{flag}: must be > 0" in capsys.readouterr().err


def test_gpu_run_script_parses():
    """bench/gpu_run.sh runs only on a GPU machine: at least its syntax is checked here."""
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    script = Path(__file__).resolve().parents[2] / "bench" / "gpu_run.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_e2e_paired_ratio_pairs_steps_of_the_same_round():
    # Round 2 ran on a busy host: both steps slowed. The paired ratio pairs them; the ratio of
    # medians pairs AdamW's quiet median with NSO's busy one.
    def row(contender, times, batch=32):
        return dict(model="m", batch=batch, contender=contender, ms_per_round=times,
                    ms_per_step=statistics.median(times), ms_min=min(times))
    rows = [row("adamw", [10.0, 20.0, 10.0, 11.0]), row("nso flatfused", [21.0, 40.0, 22.0, 40.0]),
            row("adamw", [5.0], batch=8)]
    fb.e2e_ratios(rows)
    nso = rows[1]
    assert nso["ratio_vs_adamw_paired"] == pytest.approx(statistics.median([2.1, 2.0, 2.2, 40 / 11]))
    assert nso["ratio_vs_adamw"] == pytest.approx(31.0 / 10.5)
    assert rows[0]["ratio_vs_adamw_paired"] == 1.0
    legacy = [dict(model="m", batch=1, contender="adamw", ms_per_step=1.0, ms_min=1.0)]
    fb.e2e_ratios(legacy)  # a saved run from before per-round times: no paired ratio
    assert legacy[0]["ratio_vs_adamw_paired"] is None


def test_cheap_schedules_end_to_end_count_their_cycle():
    """A cheap schedule's end-to-end "step" is its cycle of `every` optimizer steps (timed per
    step), and its passes are the cycle's average: every 5 steps one full step (2 passes, NSO's
    with reuse 3) and four of 1."""
    from flatfused.benchmark import e2e

    assert e2e.passes_e2e("nso flatfused every5") == pytest.approx(1.2)
    assert e2e.passes_e2e("nso flatfused every5+reuse") == pytest.approx(1.4)
    assert e2e.passes_e2e("sam flatfused every5+reuse") == pytest.approx(1.2)
    model = torch.nn.Linear(4, 3)
    batch = (torch.randn(6, 4), torch.randint(0, 3, (6,)))
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    opt, step = e2e.e2e_step("sam flatfused every5+reuse", model, batch, "torch")
    assert step.steps == 5 and opt.schedule.every == 5 and opt.schedule.reuse == 0.7
    step()
    assert opt.steps_taken == 5 and len(calls) == 6  # one 2-pass step, four 1-pass ones
    assert "nso flatfused every5" in e2e.E2E_CONTENDERS
