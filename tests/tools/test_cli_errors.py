"""Bad command-line input to every ``flatfused`` command: one line on stderr, exit status 2, no
traceback, and nothing measured first (each measuring entry point is replaced by one that fails
the test when called). Outputs are checked before the work that would end by writing them."""
import json
import os
import subprocess
import sys

import pytest

from flatfused import cli

MEASURING = AssertionError("measuring began before the input was refused")


def _fail(*args, **kwargs):
    raise MEASURING


def refused(capsys, argv) -> str:
    """Runs ``flatfused <argv>`` in this process; returns its one line of stderr."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own refusal, already reported
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def no_bench(monkeypatch, tmp_path):
    """``flatfused bench`` with every measurement failing the test, run in a scratch directory
    (its default output is relative)."""
    from flatfused.benchmark import cli as bench_cli

    for name in ("run_suite", "run_e2e", "run_e2e_ddp"):
        monkeypatch.setattr(bench_cli, name, _fail)
    monkeypatch.chdir(tmp_path)
    return bench_cli


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a directory\n")
    return path


# ---------------------------------------------------------------------------- the dispatcher

def test_a_commands_own_refusal_is_one_line_with_status_2(capsys):
    # SystemExit("message") alone exits with status 1.
    err = refused(capsys, ["bench", "--ddp-ranks", "1"])
    assert err.startswith("flatfused bench: error: --ddp-ranks needs at least 2 ranks")


def test_unknown_command_is_one_line(capsys):
    err = refused(capsys, ["no-such-command"])
    assert "unknown command 'no-such-command'" in err and "bench" in err


def test_info_help(capsys):
    assert cli.main(["info", "--help"]) == 0
    assert "usage: flatfused info" in capsys.readouterr().out


def _python_m(*args):
    return subprocess.run([sys.executable, "-m", "flatfused", *args], capture_output=True,
                          text=True, timeout=120)


def test_python_m_flatfused_is_the_command():
    result = _python_m("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: flatfused <command>")
    result = _python_m("bench", "--ddp-ranks", "1")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "flatfused bench: error: --ddp-ranks needs at least 2 ranks, got 1"]


# ------------------------------------------------------------------------- flatfused bench

@pytest.mark.parametrize("where", ["under_a_file", "a_directory", "trailing_slash",
                                   "empty", "png_is_a_directory"])
def test_bench_refuses_an_unwritable_output_before_measuring(capsys, no_bench, tmp_path,
                                                             a_file, where):
    output = {"under_a_file": str(a_file / "r.json"), "a_directory": str(tmp_path),
              "trailing_slash": str(tmp_path / "r.json") + "/", "empty": "",
              "png_is_a_directory": str(tmp_path / "r.json")}[where]
    (tmp_path / "r.png").mkdir()
    err = refused(capsys, ["bench", "--output", output, "--numel", "4K", "--no-e2e",
                           "--no-progress"])
    assert "--output: cannot write" in err


def test_bench_refuses_an_unwritable_default_output(capsys, no_bench, a_file, monkeypatch):
    monkeypatch.setattr(no_bench, "default_output", lambda *a: a_file / "suite.json")
    err = refused(capsys, ["bench", "--numel", "4K", "--no-e2e", "--no-progress"])
    assert f"{a_file} is not a directory" in err


def test_bench_creates_a_checked_output_directory_when_it_writes(no_bench, tmp_path,
                                                                 monkeypatch):
    measured = []
    monkeypatch.setattr(no_bench, "run_suite", lambda *a, **k: measured.append(a[0]))
    output = tmp_path / "new" / "dir" / "r.json"
    assert cli.main(["bench", "--output", str(output), "--numel", "4K", "--no-e2e", "--no-plot",
                     "--no-progress", "--optimizers", "nso", "--bases", "sgd"]) == 0
    assert measured == [[4096]]
    assert json.loads(output.read_text())["benchmark"] == "flatfused-suite"


@pytest.mark.parametrize("args, message", [
    (["--sizes", ""], "--sizes takes comma-separated parameter counts"),
    (["--sizes", " , "], "--sizes takes comma-separated parameter counts"),
    (["--sizes", "", "--quick"], "--sizes takes comma-separated parameter counts"),
    (["--numel", ""], "--numel takes comma-separated parameter counts"),
    (["--dtypes", ""], "--dtypes: give at least one of"),
    (["--dtypes", "", "--quick"], "--dtypes: give at least one of"),
    (["--bases", " "], "--bases: give at least one of"),
    (["--ddp-ranks", "0"], "--ddp-ranks needs at least 2 ranks, got 0"),
    (["--ddp-ranks", "1"], "--ddp-ranks needs at least 2 ranks, got 1"),
    (["--ddp-ranks", "-2"], "--ddp-ranks needs at least 2 ranks, got -2"),
    (["--e2e", "--no-e2e"], "not allowed with argument"),
    (["--repeats", "0"], "--repeats: must be > 0"),
])
def test_bench_refuses_empty_lists_and_bad_counts_before_measuring(capsys, no_bench, args,
                                                                   message):
    assert message in refused(capsys, ["bench", *args, "--no-progress"])


@pytest.fixture
def saved_run(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"benchmark": "flatfused-suite", "schema": 2, "results": []}))
    return path


@pytest.mark.parametrize("case, args, message", [
    ("list", [], "not a flatfused bench result"),
    ("runs summary", [], "not a flatfused bench result"),
    ("report", ["--full", "--numel", "abc"], "--numel takes comma-separated parameter counts"),
    ("report", ["--numel", ""], "--numel takes comma-separated parameter counts"),
    ("report", ["--dtypes", ""], "--dtypes: give at least one of"),
])
def test_bench_from_json_refuses_what_it_cannot_show(capsys, no_bench, tmp_path, saved_run,
                                                     case, args, message):
    path = {"list": tmp_path / "list.json", "runs summary": tmp_path / "spread.json",
            "report": saved_run}[case]
    if case == "list":
        path.write_text("[]")
    elif case == "runs summary":  # what bench/summarize_runs.py writes
        path.write_text(json.dumps({"runs": [], "spread": {}}))
    assert message in refused(capsys, ["bench", "--from-json", str(path), *args])


# -------------------------------------------------------------------- flatfused bench-clip

@pytest.mark.parametrize("where", ["under_a_file", "a_directory", "trailing_slash"])
def test_bench_clip_refuses_an_unwritable_json_before_measuring(capsys, monkeypatch, tmp_path,
                                                                a_file, where):
    from flatfused.integrations import open_clip_bench

    monkeypatch.setattr(open_clip_bench, "measure", _fail)
    path = {"under_a_file": str(a_file / "rows.json"), "a_directory": str(tmp_path),
            "trailing_slash": str(tmp_path / "rows.json") + "/"}[where]
    err = refused(capsys, ["bench-clip", "--models", "tiny", "--json", path])
    assert "argument --json: cannot write" in err


# -------------------------------------------------------------------- flatfused sharpness

SHARPNESS = ["sharpness", "--model", "sharpness_cli_models:make_model", "--data",
             "sharpness_cli_models:batches", "--measure", "trace", "--probes", "2",
             "--no-progress"]


@pytest.fixture
def no_sharpness(monkeypatch):
    from flatfused.sharpness import cli as sharpness_cli

    monkeypatch.setattr(sharpness_cli, "measure", _fail)
    return sharpness_cli


@pytest.mark.parametrize("where", ["under_a_file", "json_is_a_directory", "a_file"])
def test_sharpness_refuses_an_unwritable_out_while_parsing(capsys, monkeypatch, no_sharpness,
                                                           tmp_path, a_file, where):
    monkeypatch.setattr(no_sharpness, "build_model", _fail)  # nothing loaded either
    out = {"under_a_file": a_file / "out", "json_is_a_directory": tmp_path,
           "a_file": a_file}[where]
    (tmp_path / "sharpness.json").mkdir()
    assert "argument --out: cannot write" in refused(capsys, [*SHARPNESS, "--out", str(out)])


@pytest.mark.parametrize("args, message", [
    (["--model-kwargs", '{"depth": 3}'], "--model-kwargs {\"depth\": 3} do not fit"),
    (["--data-kwargs", '{"n": 3}'], "--data-kwargs {\"n\": 3} do not fit"),
    (["--device", "meta"], "--device meta: the measurements run on cpu or cuda"),
    (["--loss", "sharpness_cli_models:make_model"], "--loss sharpness_cli_models:make_model on"),
    (["--seed", "-1"], "argument --seed: must be in [0, 2**63)"),
    (["--probes", "0"], "argument --probes: must be > 0"),
])
def test_sharpness_refuses_bad_input_before_measuring(capsys, no_sharpness, args, message):
    assert message in refused(capsys, [*SHARPNESS, *args])


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04truncated"])
def test_sharpness_refuses_an_unreadable_checkpoint(capsys, no_sharpness, tmp_path, content):
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(content)
    err = refused(capsys, [*SHARPNESS, "--checkpoint", str(ckpt)])
    assert f"--checkpoint {str(ckpt)!r}" in err


# ------------------------------------------------------------------------- flatfused demo

@pytest.fixture
def no_demo(monkeypatch):
    from flatfused import demo

    monkeypatch.setattr(demo, "run", _fail)
    return demo


@pytest.mark.parametrize("where", ["under_a_file", "results_is_a_directory", "trailing_file"])
def test_demo_refuses_an_unwritable_out_before_training(capsys, no_demo, tmp_path, a_file,
                                                        where):
    out = {"under_a_file": a_file / "out", "results_is_a_directory": tmp_path,
           "trailing_file": a_file}[where]
    (tmp_path / "results.json").mkdir()
    err = refused(capsys, ["demo", "--quick", "--no-progress", "--out", str(out)])
    assert "argument --out: cannot write" in err


def test_demo_checks_its_default_out(capsys, no_demo, monkeypatch, tmp_path):
    (tmp_path / "flatfused_demo").write_text("a file where the default folder goes\n")
    monkeypatch.chdir(tmp_path)
    assert "argument --out: cannot write 'flatfused_demo'" in refused(capsys, ["demo", "--quick"])


@pytest.mark.parametrize("args, message", [
    (["--first-seed", str(2 ** 64)], "argument --first-seed: must be in [0, 2**63)"),
    (["--seeds", "0"], "argument --seeds: must be > 0"),
])
def test_demo_refuses_bad_counts_in_one_line(capsys, no_demo, tmp_path, args, message):
    assert message in refused(capsys, ["demo", "--quick", "--out", str(tmp_path), *args])


# ------------------------------------------------------------------- the shared check

def test_output_problem(tmp_path, a_file):
    from flatfused._argtypes import output_problem

    assert output_problem(tmp_path / "new" / "deeper" / "r.json") is None
    assert output_problem(tmp_path / "new" / "dir", directory=True) is None
    assert output_problem(a_file) is None  # overwritten
    assert output_problem(a_file, directory=True) == "it exists and is not a directory"
    assert output_problem(tmp_path) == "it is a directory"
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert output_problem(tmp_path / "dangling" / "r.json") == \
        f"{tmp_path / 'dangling'} is not a directory"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert output_problem(locked / "r.json") == f"{locked} is not writable"
        assert output_problem(locked, directory=True) == "it is not writable"
