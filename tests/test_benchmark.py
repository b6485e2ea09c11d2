"""The benchmark machinery (flatfused bench) on tiny sizes: schema, byte model, state counting.

Timings are not checked (this is not a timed test); docs/benchmarks.md describes the method.
"""
import gc
import json
import statistics
import time
from pathlib import Path

import pytest
import torch

from flatfused import benchmark as fb

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
BACKENDS = [b for b in ("cpu",) if b in fb.default_backends(torch.device("cpu"))] or ["torch"]
ROW_KEYS = {"optimizer", "base", "dtype", "numel", "contender", "ms_per_step", "optimizer_ms_min",
            "speedup_vs_reference_fastest", "speedup_vs_baseline_fastest",
            "optimizer_ms_per_step", "passes", "params_per_s", "gb_per_s", "copy_fraction",
            "state_bytes_per_param", "state_bytes_per_param_beyond_base", "peak_bytes_per_param",
            "floor_ms", "speedup_vs_reference", "speedup_vs_baseline"}


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


def test_floor_is_bytes_or_normals():
    calib = dict(numel=1 << 20, copy_gb_per_s=10.0, torch_normal_ms=50.0,
                 flatfused_noise_ms={"cpu": 5.0})
    byte_ms = 48 * (1 << 20) / 10e9 * 1e3
    assert fb.floor_ms("nso", "sgd", torch.float32, calib) == pytest.approx(max(byte_ms, 5.0))
    assert fb.floor_ms("sam", "sgd", torch.float32, calib) == pytest.approx(
        fb.budget_bytes("sam", "sgd", torch.float32) * (1 << 20) / 10e9 * 1e3)


def test_counts():
    assert fb.parse_count("16M") == 16 << 20 and fb.parse_count("4096") == 4096
    assert fb.format_count(64 << 20) == "64M" and fb.format_count(1000) == "1000"


@pytest.fixture(scope="module")
def suite():
    return fb.run_suite([4096], [torch.float32], ["nso", "sam", "wsam"], ["sgd"],
                        backends=BACKENDS, repeats=1, progress=False, log=lambda *a, **k: None)


def test_suite_rows_and_state_counts(suite):
    assert suite["errors"] == []
    rows = {(r["optimizer"], r["contender"]): r for r in suite["results"]}
    for opt in ("nso", "sam", "wsam"):
        assert (opt, "reference") in rows and (opt, "baseline") in rows
    for r in suite["results"]:
        assert ROW_KEYS <= set(r)
        assert r["optimizer_ms_per_step"] > 0 and r["params_per_s"] > 0
        # A speedup is left out exactly where one side's optimizer time drowned in the
        # subtracted passes (at this size on a busy host it can).
        reference_row = rows[(r["optimizer"], "reference")]
        reliable = r["reliable"] and reference_row["reliable"]
        assert (r["speedup_vs_reference"] is not None) == reliable
    nso_reference = rows[("nso", "reference")]
    assert nso_reference["speedup_vs_reference"] == (1.0 if nso_reference["reliable"] else None)
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
    for r in suite["results"]:
        assert r["state_param_copies_beyond_base"] == r["state_bytes_per_param_beyond_base"] / 4
    (calib,) = suite["calibration"]
    assert calib["copy_gb_per_s"] > 0 and calib["torch_normal_ms"] > 0


def test_cli_writes_json_and_tables(tmp_path, capsys, monkeypatch):
    tiny = lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2), torch.nn.BatchNorm2d(4),  # noqa: E731
                                       torch.nn.Flatten(), torch.nn.Linear(4 * 15 * 15, 10))
    monkeypatch.setitem(fb.MODELS, "tiny", tiny)
    out = tmp_path / "r.json"
    assert fb.main(["--sizes", "4K", "--dtypes", "float32,bfloat16", "--bases", "adamw",
                    "--optimizers", "nso,asam", "--backends", BACKENDS[0], "--repeats", "1",
                    "--models", "tiny", "--batch", "2,3", "--output", str(out), "--no-progress",
                    "--no-plot"]) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "flatfused-suite" and report["schema"] == fb.SCHEMA_VERSION
    assert {"cpu", "torch", "threads", "load_average_before", "busy", "allocator_env"} \
        <= set(report["machine"])
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


def test_gpu_bandwidth_target_names_the_slowest_fused_step_per_backend_and_dtype():
    def row(optimizer, contender, numel, dtype, fraction):
        return dict(optimizer=optimizer, base="sgd", contender=contender, numel=numel, dtype=dtype,
                    copy_fraction=fraction, state_param_copies_beyond_base=1.0)
    big = 64 << 20
    results = [row("nso", "flatfused[cuda]", big, "float32", 0.91),
               row("sam", "flatfused[cuda]", 256 << 20, "float32", 0.78),  # the slowest
               row("nso", "flatfused[cuda] 3-call", big, "float32", 0.10),  # not a fused step
               row("nso", "flatfused[cuda]", 16 << 20, "float32", 0.10),  # below 64M
               row("nso", "baseline", big, "float32", 0.10),
               row("nso", "flatfused[triton]", big, "bfloat16", 0.85),
               row("nso", "flatfused[cuda]", big, "float16", 0.10)]  # not a target dtype
    report = dict(device="cuda", machine={"gpu": "NVIDIA H200"}, results=results)
    targets = {t["target"]: t for t in fb.check_targets(report) if "copy bandwidth" in t["target"]}
    assert len(targets) == 2
    fp32 = targets["NVIDIA H200 64M+ float32 flatfused[cuda] steps: lowest share of copy "
                   "bandwidth (sam/sgd at 256M)"]
    assert fp32["measured"] == 0.78 and not fp32["met"]
    bf16 = targets["NVIDIA H200 64M+ bfloat16 flatfused[triton] steps: lowest share of copy "
                   "bandwidth (nso/sgd at 64M)"]
    assert bf16["met"]
    # A CPU run has no GPU target, whatever its rows.
    assert not [t for t in fb.check_targets(dict(report, device="cpu"))
                if "copy bandwidth" in t["target"]]


def test_plot(tmp_path, suite):
    pytest.importorskip("matplotlib")
    path = fb.plot(dict(results=suite["results"], machine={"cpu": "test"}), tmp_path / "p.png")
    assert path.exists() and path.stat().st_size > 0


def test_peak_memory_sees_an_allocation():
    # No garbage of earlier tests left to be freed inside the window, which would offset it.
    gc.collect()
    with fb.PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(1 << 22)  # 16 MiB, alive long enough for the sampling thread
        time.sleep(0.02)
        del x
    if mem.bytes is None:
        pytest.skip("no malloc statistics on this platform")
    assert mem.bytes >= 16 << 20


def test_summarize_runs_gives_the_spread_of_each_target(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "summarize_runs", Path(__file__).resolve().parents[1] / "bench" / "summarize_runs.py")
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
    from flatfused import bench_ddp

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
    """bench/gpu_run.sh runs only on a lent GPU machine: at least its syntax is checked here."""
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_run.sh"
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
