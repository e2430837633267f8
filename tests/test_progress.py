"""The console Progress of dreamerv3.py and mudreamer.py (identical copies) on a fake clock."""

import importlib
import io

import pytest


@pytest.mark.parametrize("script", ["dreamerv3", "mudreamer"])
def test_progress_eta_follows_the_current_phase(script):
    """Fake clock: a fast prefill (1000 frames/s), then slow training (10 frames/s): the ETA is the training one.
    (The two scripts' Progress classes are the same code, one copy each; blast, cvrl and alm test their own phases.)"""
    d = importlib.import_module(script)
    now = [0.0]
    out = io.StringIO()
    p = d.Progress(total=10_000, window_s=30.0, clock=lambda: now[0], out=out)
    p.set_phase("prefill", 2_000)
    for t in range(1, 3):
        now[0] = t
        p.step(1000 * t, 0)
    assert p.eta() == 0.0 and "prefill ends in 0 s" in p.line()
    p.set_phase("train", 10_000)
    for t in range(1, 61):  # 60 s of training at 10 frames/s and 2 updates/s
        now[0] = 2 + t
        p.step(2000 + 10 * t, 2 * t)
    fps, ups = p.rates()
    assert fps == pytest.approx(10.0) and ups == pytest.approx(2.0)
    assert p.eta() == pytest.approx((10_000 - 2_600) / 10.0)  # the run's average (43 frames/s) would say 172 s
    assert "ETA 12.3 min" in p.line() and "updates 120 (2.00/s)" in p.line()
    p.print()
    assert out.getvalue() == p.line() + "\n"  # not a terminal: plain lines
