"""The results runner (benchmarks/run.py) and the plotter (benchmarks/plot.py) on tiny fake runs."""

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import plot  # noqa: E402
import run  # noqa: E402


def fake_run(folder, agent, env_id, seed, evals, background="plain"):
    """A run folder as the scripts write it: args.json and events with eval/episodic_return."""
    from torch.utils.tensorboard import SummaryWriter

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump({"exp_name": agent, "env_id": env_id, "seed": seed, "background": background}, f)
    w = SummaryWriter(folder)
    for step, value in evals:
        w.add_scalar("eval/episodic_return", value, step)
        w.add_scalar("charts/SPS", 1.0, step)  # another tag, must be ignored
    w.close()


def test_table_is_the_mean_and_std_over_seeds_at_the_last_frame_all_reached(tmp_path):
    fake_run(tmp_path / "a1", "dreamerv3", "cartpole-balance", 1, [(1000, 100.0), (2000, 300.0)])
    fake_run(tmp_path / "a2", "dreamerv3", "cartpole-balance", 2, [(1000, 200.0), (2000, 700.0)])
    fake_run(tmp_path / "b1", "mudreamer", "cartpole-balance", 1, [(1000, 50.0), (2000, 80.0), (3000, 90.0)])
    out, table = tmp_path / "curves.png", tmp_path / "table.md"
    assert plot.main([str(tmp_path), "--out", str(out), "--table", str(table)]) == 0
    rows = plot.final_table(plot.group(plot.find_runs([str(tmp_path)])))
    d3 = next(r for r in rows if r["agent"] == "dreamerv3")
    assert d3["mean"] == pytest.approx(500.0) and d3["std"] == pytest.approx(200.0)  # (300+700)/2, ddof 0
    assert (d3["seeds"], d3["frames"]) == (2, 2000)
    mu = next(r for r in rows if r["agent"] == "mudreamer")
    assert (mu["mean"], mu["std"], mu["seeds"], mu["frames"]) == (pytest.approx(90.0), 0.0, 1, 3000)
    text = table.read_text()
    assert "| dreamerv3 | cartpole-balance | plain | 500.0 +- 200.0 | 2 | 2000 |" in text
    fake_run(tmp_path / "b2", "mudreamer", "cartpole-balance", 2, [(1000, 10.0)])  # a seed still running
    rows = plot.final_table(plot.group(plot.find_runs([str(tmp_path)])))
    mu = next(r for r in rows if r["agent"] == "mudreamer")  # both seeds at frame 1000, not 90 beside 10
    assert (mu["mean"], mu["std"], mu["seeds"], mu["frames"]) == (pytest.approx(30.0), pytest.approx(20.0), 2, 1000)
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curve_mean_band_and_interpolation():
    runs = [dict(steps=np.array([0.0, 10.0, 20.0]), values=np.array([0.0, 10.0, 20.0])),
            dict(steps=np.array([0.0, 20.0]), values=np.array([10.0, 30.0]))]  # interpolated: 20 at step 10
    steps, mean, lo, hi = plot.curve(runs, "minmax")
    assert steps.tolist() == [0.0, 10.0, 20.0]
    assert mean.tolist() == [5.0, 15.0, 25.0] and lo.tolist() == [0.0, 10.0, 20.0] and hi.tolist() == [10.0, 20.0, 30.0]
    _, _, lo, hi = plot.curve(runs, "std")
    assert lo.tolist() == [0.0, 10.0, 20.0] and hi.tolist() == [10.0, 20.0, 30.0]  # std of two values = half the gap


def test_paper_results_file_rows():
    papers = plot.paper_results()
    row = plot.lookup(papers, "mudreamer", "cartpole-balance", "plain")
    assert (row["table"], float(row["mean"])) == ("Table 1", 990.4)
    assert float(plot.lookup(papers, "dreamerv3", "walker-run", "natural")["mean"]) == 78.7
    assert float(plot.lookup(papers, "random", "cartpole-balance", "natural")["mean"]) == 329.3
    assert float(plot.lookup(papers, "alm", "HalfCheetah-v5", "states")["mean"]) == 10789
    # CVRL Table 1 (980.5; its Table 2 lists 894.2 for the same setting; the file keeps Table 1)
    assert float(plot.lookup(papers, "cvrl", "ball_in_cup-catch", "natural")["mean"]) == 980.5
    assert float(plot.lookup(papers, "cvrl-no-sac", "walker-walk", "natural")["mean"]) == 915.2


def test_official_reference_curves(tmp_path):
    """The official DreamerV3, DreamerV2 and Dreamer v1 seeds' early curves (computed by benchmarks/official_curves.py) are
    read as curves, not as the paper's score, and drawn in the panel of its env."""
    papers = plot.paper_results()
    curves = plot.reference_curves(papers, "finger-spin", "plain")
    # (DreamerV2: BLAST's base; Dreamer v1: CVRL's)
    assert set(curves) == {("dreamerv3", "10 seeds"), ("dreamer-v2", "5 seeds"), ("dreamer-v1", "5 seeds")}
    at = {agent: dict(zip(c[0].tolist(), zip(*(x.tolist() for x in c[1:])))) for (agent, _), c in curves.items()}
    assert at["dreamerv3"][10000] == (44.2, 33.0, 66.9) and at["dreamerv3"][20000] == (243.7, 210.3, 284.7)
    assert at["dreamerv3"][30000] == (336.6, 81.2, 448.8)
    assert at["dreamer-v2"][30000] == (34.9, 5.0, 86.9) and at["dreamer-v2"][60000] == (324.0, 280.6, 414.4)
    assert at["dreamer-v1"][105000] == (8.0, 0.1, 22.3) and at["dreamer-v1"][205000] == (124.8, 0.0, 332.9)
    assert plot.reference_curves(papers, "cartpole-balance", "plain") == {}
    assert plot.lookup(papers, "dreamerv3", "finger-spin", "plain")["table"] == "Table 1"  # the star: the paper's 1M
    fake_run(tmp_path / "a1", "dreamerv3", "finger-spin", 1, [(5000, 1.0), (30000, 120.0)])
    out = tmp_path / "curves.png"
    drawn = []
    real = plot.reference_curves
    plot_ref = lambda *a: drawn.append(a[1:]) or real(*a)  # noqa: E731
    try:
        plot.reference_curves = plot_ref
        assert plot.main([str(tmp_path), "--out", str(out)]) == 0
    finally:
        plot.reference_curves = real
    assert drawn == [("finger-spin", "plain")] and out.stat().st_size > 1000


def test_plot_bad_folder_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "nope")])
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path)])
    assert "no run with 'eval/episodic_return'" in capsys.readouterr().err


def test_runner_expands_and_dry_run_prints_commands(tmp_path, capsys):
    argv = ["--agents", "dreamerv3", "mudreamer", "--env-ids", "cartpole-balance", "walker-walk", "--seeds", "1", "2",
            "--out", str(tmp_path), "--dry-run", "--", "--total-timesteps", "1000"]
    assert run.main(argv) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("would run")]
    assert len(lines) == 8
    assert any("mudreamer.py --env-id walker-walk --seed 2 --total-timesteps 1000" in ln for ln in lines)
    assert not os.listdir(tmp_path)  # nothing was run or written


def test_runner_runs_skips_finished_and_reports_died(tmp_path, capsys, monkeypatch):
    folder = str(tmp_path / "dreamerv3" / "cartpole-balance" / "seed1")
    # A stand-in for the script: prints the final JSON line after writing to stderr.
    code = "import sys, json; print('x', file=sys.stderr); print(json.dumps({'final_eval_return': 42.0}))"
    monkeypatch.setattr(run, "command", lambda agent, env_id, seed, extra: [sys.executable, "-c", code])
    argv = ["--agents", "dreamerv3", "--env-ids", "cartpole-balance", "--out", str(tmp_path)]
    assert run.main(argv) == 0
    assert run.final_result(folder) == {"final_eval_return": 42.0}
    assert open(os.path.join(folder, "stderr.log")).read() == "x\n"
    assert "finished" in capsys.readouterr().out
    assert run.main(argv) == 0  # same command again: skipped
    assert "done     " + folder in capsys.readouterr().out
    # A run that died: stdout without the final line; reported with its stderr tail, then rerun.
    open(os.path.join(folder, "stdout.log"), "w").write("frames 10\n")
    open(os.path.join(folder, "stderr.log"), "w").write("Traceback\nBoom: out of memory\n")
    dies = [sys.executable, "-c", "raise SystemExit(3)"]
    monkeypatch.setattr(run, "command", lambda agent, env_id, seed, extra: dies)
    assert run.main(argv) == 1
    out = capsys.readouterr().out
    assert "died" in out and "Boom: out of memory" in out and "exit 3, no final line" in out


def test_runner_resumes_a_died_run_from_its_checkpoint_or_restarts_it(tmp_path, capsys, monkeypatch):
    """A died run with a checkpoint is rerun with --resume runs/{run}; one without is restarted with its partial
    run dir set aside in died/N/, which the plotter skips."""
    folder = tmp_path / "dreamerv3" / "cartpole-balance" / "seed1"
    code = "import sys, json; print(json.dumps({'final_eval_return': 1.0, 'argv': sys.argv[1:]}))"
    monkeypatch.setattr(run, "command", lambda agent, env_id, seed, extra: [sys.executable, "-c", code, *extra])
    argv = ["--agents", "dreamerv3", "--env-ids", "cartpole-balance", "--out", str(tmp_path), "--", "--x", "1"]
    os.makedirs(folder / "runs" / "old")  # killed after its checkpoint: no final line
    (folder / "runs" / "old" / "checkpoint.pt").write_bytes(b"ck")
    (folder / "stdout.log").write_text("[train] frames 100\n")
    (folder / "stderr.log").write_text("Killed\n")
    assert run.main(argv) == 0
    assert "resuming from its checkpoint in " + os.path.join("runs", "old") in capsys.readouterr().out
    assert run.final_result(str(folder))["argv"] == ["--x", "1", "--resume", os.path.join("runs", "old")]
    assert (folder / "died" / "1" / "stdout.log").read_text() == "[train] frames 100\n"
    assert (folder / "runs" / "old" / "checkpoint.pt").exists()  # resumed in place
    # died before any checkpoint: restarted afresh, the partial run set aside and not plotted
    other = tmp_path / "dreamerv3" / "cartpole-balance" / "seed2"
    fake_run(other / "runs" / "partial", "dreamerv3", "cartpole-balance", 2, [(1000, 5.0)])
    (other / "stdout.log").write_text("[prefill]\n")
    assert run.main(argv[:6] + ["--seeds", "2"] + argv[6:]) == 0
    assert "no checkpoint: restarting" in capsys.readouterr().out
    assert run.final_result(str(other))["argv"] == ["--x", "1"]
    assert (other / "died" / "1" / "runs" / "partial" / "args.json").exists() and not os.listdir(other / "runs")
    assert plot.find_runs([str(tmp_path)]) == []


def test_runner_bad_agent_names_the_flag(capsys):
    with pytest.raises(SystemExit):
        run.main(["--agents", "dreamerv4", "--env-ids", "x"])
    assert "--agents" in capsys.readouterr().err
