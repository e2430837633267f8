"""Helpers for the CLI smoke runs of the pixel agents' tests (not a test module)."""

import json
import math
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def events(run_dir):
    """TensorBoard's own reader over a run folder (scalars and images kept whole)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(run_dir, size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea


def run_cli(script, cwd, flags, switches=(), timeout=600, env=None):
    """Run `python ROOT/script --switch ... --flag=value ...` on one thread in `cwd`.

    Asserts exit code 0; returns (final JSON line as a dict, run directory, its events). The timeout is a hang
    guard, not a speed test (each smoke run needs about 20 s of CPU; a busy machine stretches the wall time)."""
    cmd = [sys.executable, os.path.join(ROOT, script), *switches]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **(env or {}))
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    final = json.loads(out.stdout.strip().splitlines()[-1])
    run_dir = os.path.join(cwd, final["run_dir"])
    return final, run_dir, events(run_dir)


def assert_finite_scalars(ea, tags):
    """Every tag was logged and every logged value is finite."""
    logged = ea.Tags()["scalars"]
    for tag in tags:
        assert tag in logged, tag
        assert all(math.isfinite(e.value) for e in ea.Scalars(tag)), tag


def assert_cli_error(script, cwd, argv, *needles, code=2):
    """Bad input through the real command line: exit code `code` (2: a command-line error), one line `error: ...`
    naming `needles`, no traceback."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == code, (argv, out.returncode, out.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, out.stderr[-2000:])
    for needle in needles:
        assert needle in lines[0], (argv, needle, lines[0])
    return lines[0]


def random_pixel_batch(B, T, generator, action_dim=2, size=16):
    """A (B, T) replay-shaped batch of random 3 x size x size uint8 frames, actions in [-1, 1], Normal rewards and
    random episode starts (20%) and ends (10%), drawn from `generator` in that order."""
    import torch

    g = generator
    return dict(obs=torch.randint(0, 256, (B, T, 3, size, size), dtype=torch.uint8, generator=g),
                action=torch.rand(B, T, action_dim, generator=g) * 2 - 1, reward=torch.randn(B, T, generator=g),
                is_first=torch.rand(B, T, generator=g) < 0.2, is_terminal=torch.rand(B, T, generator=g) < 0.1)


def assert_close_dicts(actual, expected, rtol=1e-4, atol=1e-5):
    """The same keys, and each tensor of `actual` close to `expected`'s (the failing key named): metrics or states."""
    import torch

    assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    for k, v in expected.items():
        torch.testing.assert_close(actual[k], v, rtol=rtol, atol=atol, msg=k)


def interrupt_cli(script, cwd, flags, sig, wait_for="[train]", timeout=300):
    """Start a tiny run, send `sig` once a stdout line contains `wait_for`; returns (exit code, stdout, stderr)."""
    import signal
    import time

    cmd = [sys.executable, os.path.join(ROOT, script)] + [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    with open(os.path.join(cwd, "out.txt"), "w") as out, open(os.path.join(cwd, "err.txt"), "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True)
        deadline = time.time() + timeout
        while wait_for not in open(os.path.join(cwd, "out.txt")).read():
            assert proc.poll() is None and time.time() < deadline, open(os.path.join(cwd, "err.txt")).read()[-2000:]
            time.sleep(0.5)
        os.killpg(proc.pid, sig) if sig == signal.SIGINT else proc.send_signal(sig)  # Ctrl-C reaches the group
        code = proc.wait(timeout=timeout)
    return code, open(os.path.join(cwd, "out.txt")).read(), open(os.path.join(cwd, "err.txt")).read()


def assert_clean_interrupt(script, cwd, flags, sig, scalars=("charts/SPS",)):
    """`sig` sent to a tiny run: exit code 128 + signal, exactly one stderr line saying where it stopped (no
    traceback, no warning), the events written so far readable with `scalars`. Returns the run's stdout."""
    import glob

    code, out, err = interrupt_cli(script, cwd, flags, sig)
    assert code == 128 + int(sig), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"interrupted ({sig.name}) at frame"), err
    ea = events(glob.glob(os.path.join(cwd, "runs", "*"))[0])
    assert set(scalars) <= set(ea.Tags()["scalars"]), ea.Tags()["scalars"]
    return out


def assert_tracks_offline(script, cwd, flags):
    """--track in wandb's offline mode (no account, no network) writes one local wandb run."""
    import glob

    run_cli(script, cwd, flags, ("--track",), env={"WANDB_MODE": "offline", "WANDB_DIR": str(cwd)})
    runs = glob.glob(os.path.join(cwd, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(runs) == 1 and os.path.getsize(runs[0]) > 0


def kill_after_first_checkpoint(script, cwd, flags, timeout=600):
    """Start a tiny run, SIGKILL its process group as soon as `checkpoint.pt` appears in its run dir (a checkpoint
    only appears whole: it is renamed into place). Returns (run dir, the checkpoint as saved)."""
    import glob
    import signal
    import time

    import torch

    cmd = [sys.executable, os.path.join(ROOT, script)] + [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    with open(os.path.join(cwd, "out.txt"), "w") as out, open(os.path.join(cwd, "err.txt"), "w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True)
        deadline = time.time() + timeout
        while not glob.glob(os.path.join(cwd, "runs", "*", "checkpoint.pt")):
            assert proc.poll() is None and time.time() < deadline, open(os.path.join(cwd, "err.txt")).read()[-2000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    path = glob.glob(os.path.join(cwd, "runs", "*", "checkpoint.pt"))[0]
    return os.path.dirname(path), torch.load(path, weights_only=True)


def resume_cli(script, cwd, run_dir, *argv, timeout=600):
    """`script --resume run_dir argv...` to its end: asserts exit 0; returns {"stdout", "final" (JSON line)}."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--resume", str(run_dir), *argv], cwd=cwd,
                         env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return {"stdout": out.stdout, "final": json.loads(out.stdout.strip().splitlines()[-1])}


def eval_checkpoint_cli(script, cwd, path, *argv, timeout=600):
    """`script --eval-checkpoint path argv...` to its end: asserts exit 0; returns its final JSON line as a dict."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--eval-checkpoint", str(path), *argv],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def truncated_copy(src, dst, n=1000):
    """The first `n` bytes of checkpoint `src` written to `dst` (what a non-atomic write cut short leaves)."""
    with open(src, "rb") as f:
        head = f.read(n)
    with open(dst, "wb") as f:
        f.write(head)
    return dst


def fill_pixel_replay(replay, steps, rng):
    """`steps` rows of random uint8 frames, actions in [-1, 1] and Normal rewards in every stream, one episode
    starting at row 0 and no terminal (for the restore-equals-uninterrupted tests)."""
    n, shape, a = replay.num_envs, replay.obs.shape[2:], replay.action.shape[-1]
    for t in range(steps):
        replay.add(rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.uniform(-1, 1, (n, a)).astype(np.float32),
                   rng.normal(size=n).astype(np.float32), np.full(n, t == 0), np.zeros(n, bool))


# The sizes of the tiny runs of both DreamerV3-family scripts' tests (dreamerv3.py, mudreamer.py).
DREAMER_TINY = dict(deter=16, units=16, stoch=4, classes=4, cnn_depth=4, mlp_layers=1, batch_size=2, batch_length=8,
                    imag_horizon=3, train_ratio=8, buffer_size=2000, time_limit=60)


def dreamer_main_args(module, **kw):
    """`module.Args` (dreamerv3 or mudreamer) for main() of an 80-frame cartpole-balance run with the DREAMER_TINY
    sizes (40-step episodes, a log every 40 frames, one final evaluation episode, no video), overridden by kw."""
    return module.Args(**{**DREAMER_TINY, "time_limit": 40, "env_id": "cartpole-balance", "num_envs": 1,
                          "total_timesteps": 80, "eval_every": 10**6, "eval_episodes": 1, "log_every": 40,
                          "video_every": 0, **kw})


# Bad inputs both DreamerV3-family scripts (dreamerv3.py, mudreamer.py) must refuse in one line: (argv, needles).
DREAMER_BAD_INPUTS = [
    (["--env-id", "walker-sprint"], ["--env-id", "walker-sprint"]),
    (["--env-id", "Hopper-v5"], ["--env-id Hopper-v5", "learns from pixels"]),
    (["--total-timesteps", "-5"], ["--total-timesteps", "-5"]),
    (["--num-envs", "0"], ["--num-envs", "got 0"]),
    (["--train-ratio", "0"], ["--train-ratio", "got 0"]),
    (["--batch-length", "1"], ["--batch-length", "got 1"]),
    (["--buffer-size", "10"], ["--buffer-size", "got 10"]),
    (["--gamma", "1.5"], ["--gamma", "1.5"]),
    (["--precision", "fp16"], ["--precision must be one of fp32, bf16, got fp16"]),
    (["--compile-backend", "cudagraphs"], ["--compile-backend must be one of inductor, aot_eager, got cudagraphs"]),
    (["--seed", "-1"], ["--seed must be >= 0, got -1"]),
    (["--resume", "no/such/dir"], ["--resume no/such/dir: no such run directory (give the run's folder"]),
    (["--env-id", "cartpole-balance", "--buffer-size", "100000000000"], ["--buffer-size 100000000000"]),
]


def assert_nan_action_stops_the_run(module, args, monkeypatch, capsys):
    """The policy's first action made NaN (as from diverged networks): main stops with one `error:` line naming the
    action (exit code 3), before the simulator fails on it with a PhysicsError traceback."""
    import pytest

    real = module.policy

    def nan_policy(*a, **k):
        action, *rest = real(*a, **k)
        return (action * float("nan"), *rest)

    monkeypatch.setattr(module, "policy", nan_policy)
    with pytest.raises(SystemExit) as e:
        module.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 3 and len(err) == 1, err
    assert err[0].startswith("error: non-finite action from the policy") and "; last checkpoint: " in err[0], err


def assert_sigterm_writes_a_checkpoint_then_resume_finishes(script, cwd, flags, min_updates=1,
                                                            then_without_checkpoints=False):
    """SIGTERM during [train], before the first periodic checkpoint (`flags` put it past the run's end): the
    interrupt writes RUN/checkpoint.pt at the frame it stopped (exit code 143, one stderr line naming that frame and
    the --resume command), with at least `min_updates` updates; --resume RUN/checkpoint.pt (the file form) finishes
    with the final JSON line; resumed again, the finished run prints its saved summary and trains nothing.
    `then_without_checkpoints`: the same run again with --checkpoint-every 0, whose line says that none was written."""
    import glob
    import shutil
    import signal

    import torch

    total = flags["total_timesteps"]
    code, out, err = interrupt_cli(script, cwd, flags, signal.SIGTERM)
    run_dir = glob.glob(os.path.join(cwd, "runs", "*"))[0]
    ck = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    frame, updates = ck["loop"]["global_step"], ck["loop"]["updates"]
    rel = os.path.relpath(run_dir, cwd)
    assert code == 143 and err.strip().splitlines() == [
        f"interrupted (SIGTERM) at frame {frame}/{total} after {updates} updates; checkpoint written: --resume {rel} "
        f"continues from frame {frame}"], err
    assert 0 < frame < total and updates >= min_updates and ck["replay"]["count"] >= frame // 2
    resumed = resume_cli(script, cwd, os.path.join(run_dir, "checkpoint.pt"))
    assert f"resumed at frame {frame}" in resumed["stdout"] and "prefilling" not in resumed["stdout"]
    final = resumed["final"]
    assert final["global_step"] == total and final["updates"] > updates and math.isfinite(final["final_eval_return"])
    again = resume_cli(script, cwd, run_dir)
    assert again["final"] == final and again["stdout"].strip() == json.dumps(final)  # nothing built or trained
    if then_without_checkpoints:
        shutil.rmtree(os.path.join(cwd, "runs"))
        code, out, err = interrupt_cli(script, cwd, {**flags, "checkpoint_every": 0}, signal.SIGTERM)
        assert code == 143 and err.strip().endswith("; no checkpoint (--checkpoint-every 0)"), err


def assert_interrupt_wrote_no_checkpoint(cwd):
    """After an interrupt_cli run with --checkpoint-every 0: its one stderr line says that no checkpoint was
    written, and the run folder has none."""
    import glob

    line = open(os.path.join(cwd, "err.txt")).read().strip()
    assert line.endswith("; no checkpoint (--checkpoint-every 0)") and not os.path.exists(glob.glob(
        os.path.join(cwd, "runs", "*"))[0] + "/checkpoint.pt"), line


def cut_the_final_evaluation(module, args, monkeypatch):
    """`module.main(args)` (in the current folder) with its evaluation cut by an interrupt (SIGTERM's
    KeyboardInterrupt): asserts exit code 143, then puts the real `evaluate` back for the resume. Returns (the run
    folder, relative: runs/NAME, the checkpoint's loop state)."""
    import glob

    import pytest
    import torch

    evaluate = module.evaluate

    def cut(*a, **k):
        raise KeyboardInterrupt("SIGTERM")

    monkeypatch.setattr(module, "evaluate", cut)
    with pytest.raises(SystemExit) as e:
        module.main(args)
    assert e.value.code == 143
    run_dir = glob.glob(os.path.join("runs", "*"))[0]
    loop = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)["loop"]
    monkeypatch.setattr(module, "evaluate", evaluate)
    return run_dir, loop


def non_finite_loss_run(module, args, metric, monkeypatch, capsys):
    """`module.main(args)` (in the current folder) with `metric` of every update's metrics made NaN: asserts exit
    code 3 and that the events written so far are kept; returns the stderr lines (for the caller's exact message)."""
    import glob

    import pytest

    real_update = module.update

    def bad_update(*a, **k):
        metrics = real_update(*a, **k)
        metrics[metric] = metrics[metric] * float("nan")
        return metrics

    monkeypatch.setattr(module, "update", bad_update)
    with pytest.raises(SystemExit) as e:
        module.main(args)
    assert e.value.code == 3
    assert glob.glob(os.path.join("runs", "*", "events.out.tfevents.*"))  # what was written is kept
    return capsys.readouterr().err.strip().splitlines()


def progress_after_a_fast_phase(module, phase="prefill", window_s=30.0):
    """`module.Progress` of 10,000 frames on a fake clock, after 2 s of a fast first `phase` (1000 frames/s) that
    ends at 2,000 frames: asserts its ETA is 0 and its line says "`phase` ends in 0 s". Returns (the Progress, the
    clock's one-item list `now` to move time on, its output stream)."""
    import io

    now = [0.0]
    out = io.StringIO()
    p = module.Progress(total=10_000, window_s=window_s, clock=lambda: now[0], out=out)
    p.set_phase(phase, 2_000)
    for t in range(1, 3):
        now[0] = t
        p.step(1000 * t, 0)
    assert p.eta() == 0.0 and f"{phase} ends in 0 s" in p.line()
    return p, now, out


def assert_progress_shows(p, out, fps, ups, eta, *texts):
    """Progress `p` measures `fps` frames/s and `ups` updates/s, its ETA is `eta` seconds, its line holds each of
    `texts`, and print() writes that line plainly to `out` (not a terminal: no carriage return)."""
    import pytest

    measured_fps, measured_ups = p.rates()
    assert measured_fps == pytest.approx(fps) and measured_ups == pytest.approx(ups)
    assert p.eta() == pytest.approx(eta)
    for text in texts:
        assert text in p.line(), (text, p.line())
    p.print()
    assert out.getvalue() == p.line() + "\n"  # not a terminal: plain lines


def assert_dreamer_update_and_acting_create_no_tensor_beside_the_parameters(module, args, data, discrete):
    """GPU safety without a GPU, for dreamerv3 or mudreamer (`module`): under torch.device("meta") every tensor
    created without device= lands on meta, and an op mixing it with the CPU parameters fails; two updates on `data`
    (a (B, T) batch of 3 x 16 x 16 frames and 2-dim actions, made one-hot when `discrete`) and three acting steps on
    its first two streams must run, with finite metrics and actions on the CPU. Adam creates its step counters lazily
    with torch.tensor() (on the CPU in a CUDA run too: torch's design), so one update comes first."""
    import torch

    torch.manual_seed(0)
    nets, opts = module.build_agent(args, (3, 16, 16), 2, discrete, torch.device("cpu"))
    if discrete:
        data["action"] = torch.nn.functional.one_hot(data["action"].argmax(-1), 2).float()
    module.update(*nets.values(), opts, data, args)
    with torch.device("meta"):
        for _ in range(2):
            metrics = module.update(*nets.values(), opts, data, args)
        module.set_mode(False, nets["wm"], nets["actor"])
        state = module.initial_state(nets["wm"], nets["actor"], 2, torch.device("cpu"))
        for t in range(3):
            action, state = module.policy(nets["wm"], nets["actor"], state, data["obs"][:2, t],
                                          data["is_first"][:2, t])
        module.set_mode(True, nets["wm"], nets["actor"])
    assert all(v.device.type == "cpu" and torch.isfinite(v) for v in metrics.values())
    assert action.device.type == "cpu" and action.shape == (2, 2)


def assert_help_documents_every_hyperparameter(args_cls, capsys, sources):
    """tyro's --help of `args_cls` (white space folded) names every field as its --flag, and quotes each of
    `sources` (where a default comes from)."""
    import dataclasses

    import pytest
    import tyro

    with pytest.raises(SystemExit):
        tyro.cli(args_cls, args=["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(args_cls):
        assert f"--{field.name.replace('_', '-')}" in text, field.name
    for source in sources:
        assert source in text, source
