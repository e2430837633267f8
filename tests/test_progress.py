"""The console Progress of dreamerv3.py and mudreamer.py (identical copies) on a fake clock."""

import importlib

import pytest

from smoke import assert_progress_shows, progress_after_a_fast_phase


@pytest.mark.parametrize("script", ["dreamerv3", "mudreamer"])
def test_progress_eta_follows_the_current_phase(script):
    """Fake clock: a fast prefill (1000 frames/s), then slow training (10 frames/s): the ETA is the training one.
    (The two scripts' Progress classes are the same code, one copy each; blast, cvrl and alm test their own phases.)"""
    p, now, out = progress_after_a_fast_phase(importlib.import_module(script), "prefill")
    p.set_phase("train", 10_000)
    for t in range(1, 61):  # 60 s of training at 10 frames/s and 2 updates/s
        now[0] = 2 + t
        p.step(2000 + 10 * t, 2 * t)
    # ETA: the run's average (43 frames/s) would say 172 s
    assert_progress_shows(p, out, 10.0, 2.0, (10_000 - 2_600) / 10.0, "ETA 12.3 min", "updates 120 (2.00/s)")
