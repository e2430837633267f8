"""Environments: DMC from pixels and gymnasium MuJoCo from states, through common.envs.make_env."""

import os
import subprocess
import sys

import numpy as np
import pytest

from common.envs import GYM_MUJOCO_IDS, TABLE1_TASKS, make_env, make_vector_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rollout(env, actions):
    """Observations, rewards, and the final (terminated, truncated, info) of a fixed action sequence."""
    obs = [env.reset()[0]]
    rewards = []
    for a in actions:
        o, r, term, trunc, info = env.step(a)
        obs.append(o)
        rewards.append(r)
    return np.stack(obs), np.array(rewards), (term, trunc, info)


def test_dmc_observations_are_channels_first_uint8_and_actions_in_unit_box():
    env = make_env("walker-run", seed=0)
    obs, info = env.reset()
    assert obs.shape == (3, 64, 64) and obs.dtype == np.uint8 and env.observation_space.contains(obs)
    assert env.action_space.shape == (6,) and (env.action_space.low == -1).all() and (env.action_space.high == 1).all()
    assert obs.std() > 0  # a real render, not a blank frame
    assert (env.action_repeat, env.time_limit, env.camera) == (2, 1000, 0)


def test_action_repeat_sums_the_rewards_of_the_repeated_frames():
    actions = np.random.default_rng(0).uniform(-1, 1, (6, 1))
    obs2, rew2, _ = rollout(make_env("cartpole-swingup", seed=3, action_repeat=2), actions)
    obs1, rew1, _ = rollout(make_env("cartpole-swingup", seed=3, action_repeat=1), np.repeat(actions, 2, axis=0))
    np.testing.assert_allclose(rew2, rew1.reshape(6, 2).sum(1), rtol=1e-12)
    np.testing.assert_array_equal(obs2[1:], obs1[2::2])
    assert rew2.min() > 0  # swingup rewards are dense and positive, so the check has teeth


@pytest.mark.parametrize("time_limit,repeat,steps", [(10, 2, 5), (7, 2, 4), (6, 3, 2)])
def test_time_limit_counts_environment_frames_and_truncates(time_limit, repeat, steps):
    env = make_env("cartpole-balance", seed=0, time_limit=time_limit, action_repeat=repeat)
    env.reset()
    for i in range(steps):
        _, _, term, trunc, info = env.step(np.zeros(1))
        assert not term
        assert trunc == (i == steps - 1)
    assert info["episode"]["l"] == time_limit  # the episode length is in frames, after action repeat
    assert info["episode"]["r"] > 0


def test_same_seed_gives_identical_envs_and_another_seed_does_not():
    actions = np.random.default_rng(1).uniform(-1, 1, (5, 6))
    a, ra, _ = rollout(make_env("walker-walk", seed=7), actions)
    b, rb, _ = rollout(make_env("walker-walk", seed=7), actions)
    c, _, _ = rollout(make_env("walker-walk", seed=8), actions)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ra, rb)
    assert not np.array_equal(a, c)
    env = make_env("walker-walk", seed=0)  # reset(seed=...) reseeds the task's initial state
    np.testing.assert_array_equal(env.reset(seed=7)[0], a[0])


@pytest.mark.parametrize("env_id", TABLE1_TASKS)
def test_every_table1_task_constructs_and_steps(env_id):
    env = make_env(env_id, seed=0)
    obs, _ = env.reset()
    obs2, reward, term, trunc, _ = env.step(env.action_space.sample())
    assert obs.shape == obs2.shape == (3, 64, 64) and obs2.dtype == np.uint8
    assert np.isfinite(reward) and not term and not trunc
    assert env.camera == (2 if env_id.startswith("quadruped") else 0)


def test_cup_is_an_alias_of_ball_in_cup():
    actions = np.zeros((3, 2))
    np.testing.assert_array_equal(rollout(make_env("cup-catch", 4), actions)[0],
                                  rollout(make_env("ball_in_cup-catch", 4), actions)[0])


@pytest.mark.parametrize("bad", ["walker-runn", "walker", "walker-run-fast", "Hopper-v99", ""])
def test_unknown_env_ids_fail_at_once_in_one_short_line(bad):
    with pytest.raises(ValueError) as e:
        make_env(bad, seed=0)
    msg = str(e.value)
    assert msg.startswith(f"--env-id {bad!r} is not") and "\n" not in msg and len(msg) < 500
    assert "walker-walk" in msg and "HalfCheetah-v5" in msg and "python -m common.envs --list" in msg


def test_unknown_env_id_suggests_the_closest_ones():
    for bad, meant in (("Hopper-v4", "did you mean Hopper-v5"), ("walker-runn", "did you mean walker-run"),
                       ("cartpole-balnce", "did you mean cartpole-balance")):
        with pytest.raises(ValueError, match=meant):
            make_env(bad, seed=0)
    out = subprocess.run([sys.executable, "-m", "common.envs", "--list"], cwd=ROOT, capture_output=True, text=True)
    ids = out.stdout.split()
    assert out.returncode == 0 and "Hopper-v5" in ids and "walker-walk" in ids and len(ids) == len(set(ids)) > 60


def test_halfcheetah_builds_without_mujoco_warnings():
    """gymnasium's XML uses the deprecated `settotalmass`; MuJoCo 3.17+ warns at every load: silenced, only that."""
    code = "from common.envs import make_env; make_env('HalfCheetah-v5', 0).close()"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "settotalmass" not in out.stderr + out.stdout, out.stderr


def test_bad_options_name_the_flag():
    with pytest.raises(ValueError, match="--action-repeat"):
        make_env("walker-run", seed=0, action_repeat=0)
    with pytest.raises(ValueError, match="--background"):
        make_env("walker-run", seed=0, background="sunset")
    with pytest.raises(ValueError, match="--background"):
        make_env("Hopper-v5", seed=0, background="natural")


@pytest.mark.parametrize("env_id,obs_dim", [("Hopper-v5", 11), ("AntTruncatedObs-v5", 27),
                                            ("HumanoidTruncatedObs-v5", 45), ("Ant-v5", 105)])
def test_gymnasium_mujoco_tasks_from_states(env_id, obs_dim):
    assert env_id in GYM_MUJOCO_IDS
    env = make_env(env_id, seed=0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (obs_dim,)


def test_gymnasium_tasks_report_episode_statistics():
    env = make_env("Hopper-v5", seed=0)
    env.reset(seed=0)
    total, steps = 0.0, 0
    while True:  # a constant extreme action makes the hopper fall within a few dozen steps
        _, r, term, trunc, info = env.step(np.ones(3))
        total, steps = total + r, steps + 1
        if term or trunc:
            break
    assert term and info["episode"]["l"] == steps and info["episode"]["r"] == pytest.approx(total)


def test_vector_env_autoresets_on_the_next_step_in_subprocesses():
    envs = make_vector_env("cartpole-balance", num_envs=2, seed=0, time_limit=4)
    try:
        obs, _ = envs.reset(seed=0)
        assert obs.shape == (2, 3, 64, 64)
        assert not np.array_equal(obs[0], obs[1])  # seeds 0 and 1
        a = np.zeros((2, 1), np.float32)
        _, r1, _, trunc1, _ = envs.step(a)
        last, r2, term2, trunc2, info = envs.step(a)  # 4 frames: the episode ends here
        first, r3, term3, trunc3, _ = envs.step(a)  # NEXT_STEP: this step returns a reset observation
        assert not trunc1.any() and trunc2.all() and not term2.any()
        assert info["_episode"].all() and (info["episode"]["l"] == 4).all()
        np.testing.assert_allclose(info["episode"]["r"], r1 + r2)
        assert (r3 == 0).all() and not trunc3.any() and not term3.any()
        assert not np.array_equal(first, last)
    finally:
        envs.close()


def test_readme_one_liner_and_headless_default():
    env = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    code = ("from common.envs import make_env; import os; e = make_env('walker-run', seed=0); "
            "o, _ = e.reset(); print(o.shape, o.dtype, os.environ['MUJOCO_GL'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "(3, 64, 64) uint8 egl"


def test_video_frames_are_large_renders_of_the_same_state_and_only_env_0_renders():
    plain, natural = make_env("cartpole-balance", 3), make_env("cartpole-balance", 3, background="natural")
    assert plain.video_frame() is None  # off unless asked
    plain.video_size = natural.video_size = 256
    obs_p, obs_n = plain.reset()[0], natural.reset()[0]
    big_p, big_n = plain.video_frame(), natural.video_frame()
    assert big_p.shape == (256, 256, 3) and big_n.shape == (256, 512, 3)
    # Same state, 4x the pixels: block means of the large render approximate the agent's 64x64 view.
    small = big_p.reshape(64, 4, 64, 4, 3).mean((1, 3))
    assert np.abs(small - obs_p.transpose(1, 2, 0)).mean() < 8
    np.testing.assert_array_equal(big_n[:, :256], big_p)  # the left half is the plain scene ...
    np.testing.assert_array_equal(big_n[::4, 256::4], obs_n.transpose(1, 2, 0))  # ... the right the agent's view
    envs = make_vector_env("cartpole-balance", 2, 0, video_size=128)
    envs.reset(seed=0)
    first, second = envs.call("video_frame")
    envs.close()
    assert first.shape == (128, 128, 3) and second is None


def test_encode_video_writes_a_decodable_mp4(tmp_path):
    import av

    from common.envs import encode_video

    frames = np.zeros((12, 64, 96, 3), np.uint8)
    frames[:, :, :48, 0] = np.arange(12, dtype=np.uint8)[:, None, None] * 20
    path = str(tmp_path / "v" / "a.mp4")
    encode_video(path, frames, fps=10)
    with av.open(path) as c:
        back = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])
    assert back.shape == frames.shape and not os.path.exists(path + ".tmp")
    assert np.abs(back.astype(int) - frames).mean() < 6  # lossy, but the same pictures
