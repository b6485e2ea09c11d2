"""``flatfused demo``: the quick configuration end to end (table, JSON, plot, matched compute),
determinism, and refusal of bad input."""
import importlib.util
import json

import pytest

from flatfused import cli, demo


def _run(tmp_path, *extra):
    out = tmp_path / "out"
    code = cli.main(["demo", "--quick", "--no-progress", "--out", str(out), *extra])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_quick_run_table_json_plot_and_matched_compute(tmp_path, capsys):
    out, record = _run(tmp_path)
    text = capsys.readouterr().out
    assert text.startswith("$ flatfused demo --quick")
    header = "| optimizer | " + " | ".join(title for _, title, _, _ in demo.MEASURES) + " |"
    assert header in text
    for name in demo.OPTIMIZERS:
        assert f"| {name.upper()} | " in text
    # one verdict line per measure, saying whether the lead exceeds the seed spread (or a tie)
    for _, title, better, _ in demo.MEASURES:
        verdict = [line for line in text.splitlines()
                   if line.startswith(f"{title} ({better} is better): ")]
        assert len(verdict) == 1
        assert "the seed spread" in verdict[0] or verdict[0].endswith(" tie")
    assert "wall time" in text and "(matched)" in text
    assert (out / "table.md").read_text().strip() in text

    seeds = demo.QUICK["seeds"]
    assert record["seeds"] == list(range(seeds))
    for name in demo.OPTIMIZERS:
        assert [r["seed"] for r in record["results"][name]] == record["seeds"]
        for key, *_ in demo.MEASURES:
            assert all(isinstance(r[key], float) for r in record["results"][name])
            assert set(record["summary"][name][key]) == {"mean", "std"}
    # matched compute: every optimizer made the same forward-backward passes and
    # per-example gradients, SGD by taking twice the steps of the two-pass optimizers
    compute = {name: record["compute"][name] for name in demo.OPTIMIZERS}
    assert len({(c["passes"], c["examples"]) for v in compute.values() for c in v}) == 1
    assert record["compute_matched"] is True
    sched = record["schedule"]
    assert sched["sgd"]["steps"] == 2 * sched["sam"]["steps"] == 2 * sched["nso"]["steps"]
    assert compute["nso"][0]["passes"] == 2 * sched["nso"]["steps"]

    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed" in text
    else:
        assert (out / "demo.png").stat().st_size > 0


def test_sgd_match_batch_matches_example_gradients(tmp_path):
    _, record = _run(tmp_path, "--seeds", "1", "--optimizers", "sgd,nso", "--sgd-match", "batch",
                     "--n-train", "250", "--measure-size", "64")
    sgd, nso = record["compute"]["sgd"][0], record["compute"]["nso"][0]
    assert sgd["examples"] == nso["examples"] == 2 * demo.QUICK["epochs"] * 250
    assert record["schedule"]["sgd"]["batch"] == 2 * record["schedule"]["nso"]["batch"]
    assert record["compute_matched"] is True


def test_same_seed_same_numbers(tmp_path):
    args = ("--seeds", "1", "--first-seed", "3", "--no-plot")
    _, first = _run(tmp_path / "a", *args)
    _, second = _run(tmp_path / "b", *args)
    assert first["results"] == second["results"]
    assert first["results"]["nso"][0]["seed"] == 3


@pytest.mark.parametrize("args", [
    ["--seeds", "0"], ["--label-noise", "1.0"], ["--label-noise", "-0.1"], ["--lr", "0"],
    ["--sigma", "nan"], ["--optimizers", "sgd,adam"], ["--optimizers", "sgd,sgd"],
    ["--epochs", "two"], ["--sgd-match", "time"],
])
def test_bad_arguments_are_refused(args, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--quick", *args])
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--measure-size", "100000"], "exceeds --n-train"),
    (["--sigma", "0"], "--ns-sigma"),
    (["--device", "tpu"], "--device"),
    (["--label-noise", "0.001"], "corrupts no label"),
])
def test_inconsistent_configuration_is_refused(args, message, tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--out", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err
