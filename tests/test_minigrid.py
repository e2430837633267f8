"""MiniGrid Dynamic-Obstacles-6x6 in BLAST's five renderings (common/envs.py MiniGridPixelEnv): each rendering's
defining property on real frames, goal/collision counting, the 100-step horizon, seeding, errors, a CLI run."""

import json
import math
import os

import numpy as np
import pytest

from common.envs import (DIRECTION_COLORS, MINIGRID_BASE, MINIGRID_IDS, MINIGRID_TRIANGLE, agent_coverage,
                         env_defaults, is_dmc, is_pixel, make_env, make_vector_env, valid_env_ids)
from smoke import assert_cli_error, assert_finite_scalars, run_cli
from test_backgrounds import indexed_clip, write_video_splits

PLAIN, COLOR, SMALL, RANDOM, VIDEO = MINIGRID_IDS  # in MINIGRID_RENDERINGS order
CELL = 64 / 6  # pixels per grid cell in the observation


def triangle_area(corners):
    (x0, y0), (x1, y1), (x2, y2) = corners
    return abs((x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)) / 2


def rollout(env_id, seed, actions, **options):
    """Frames (T+1, 64, 64, 3) and rewards of `actions` from reset; the agent direction before each frame."""
    env = make_env(env_id, seed, **options)
    frames, dirs, rewards = [env.reset(seed=seed)[0]], [env._env.agent_dir], []
    for a in actions:
        obs, r, *_ = env.step(a)
        frames.append(obs), dirs.append(env._env.agent_dir), rewards.append(r)
    return np.stack(frames).transpose(0, 2, 3, 1), np.array(dirs), np.array(rewards)


def agent_mass(frames):
    """Agent pixels counted by coverage: the red agent is the only thing with red above green (walls are grey,
    goal green, balls blue, floor black), so sum(max(R - G, 0)) / 255 per frame."""
    f = frames.astype(np.int64)
    return np.clip(f[..., 0] - f[..., 1], 0, None).sum((-2, -1)) / 255


ACTIONS = np.random.default_rng(0).integers(0, 3, 150)  # random left/right/forward: every direction, goals, bumps


@pytest.fixture(scope="module")
def plain_run():
    return rollout(PLAIN, 4, ACTIONS)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    """train/ with clips 0 and 1, eval/ with clip 2: constant frames coloured (frame index, 20 + 30 clip, 99)."""
    return write_video_splits(tmp_path_factory.mktemp("videos"))


def test_ids_spaces_and_defaults():
    assert list(MINIGRID_IDS) == [MINIGRID_BASE] + [f"{MINIGRID_BASE}-{r}" for r in
                                                    ("color-direction", "smaller-agent", "random-frames", "video")]
    for env_id in MINIGRID_IDS:
        assert env_id in valid_env_ids() and is_pixel(env_id) and not is_dmc(env_id)
        assert env_defaults(env_id) == dict(action_repeat=1, time_limit=100)
    env = make_env(COLOR, 0)
    obs, _ = env.reset()
    assert env.observation_space.shape == obs.shape == (3, 64, 64) and obs.dtype == np.uint8
    assert env.action_space.n == 3
    assert env_defaults("walker-run") == dict(action_repeat=2, time_limit=1000) and not is_pixel("Hopper-v5")


def test_plain_is_minigrids_own_picture(plain_run):
    """Our 192x192 render (minigrid's tiles + our agent) matches minigrid's get_frame; the observation is its 3x3 mean."""
    env = make_env(PLAIN, 4)
    env.reset(seed=4)
    for a in ACTIONS[:60]:
        obs = env.step(a)[0]
        full = env.render_full()
        theirs = env._env.get_frame(highlight=False, tile_size=32)  # minigrid truncates its tile means to uint8
        assert np.abs(full - theirs).max() < 1
        mean = full.reshape(64, 3, 64, 3, 3).mean((1, 3))
        np.testing.assert_array_equal(obs.transpose(1, 2, 0), np.rint(mean).astype(np.uint8))
    frames, dirs, _ = plain_run
    assert set(dirs) == {0, 1, 2, 3}
    # The goal cell (4, 4) is green; the agent covers minigrid's triangle area in every direction.
    c = int(4.5 * CELL)
    np.testing.assert_array_equal(frames[0, c, c], (0, 255, 0))
    np.testing.assert_allclose(agent_mass(frames), triangle_area(MINIGRID_TRIANGLE) * CELL ** 2, rtol=0.02)


def test_color_direction_changes_only_the_agents_colour_by_direction(plain_run):
    frames, dirs, rewards = plain_run
    colored, dirs2, rewards2 = rollout(COLOR, 4, ACTIONS)
    np.testing.assert_array_equal(dirs, dirs2), np.testing.assert_array_equal(rewards, rewards2)  # same states
    f = frames.astype(np.int64)
    cover = np.clip(f[..., 0] - f[..., 1], 0, None) / 255  # (T, 64, 64) the plain agent's coverage
    agent = cover > 0
    np.testing.assert_array_equal(colored[~agent], frames[~agent])  # nothing else changes
    for d in range(4):
        at = dirs == d
        expected = cover[at][..., None] * np.array(DIRECTION_COLORS[d])  # the same triangle, colour of direction d
        assert np.abs(colored[at].astype(np.int64) - np.rint(expected))[agent[at]].max() <= 1
        full = colored[at][cover[at] == 1]  # pixels wholly inside the triangle
        assert len(full) > 10 * at.sum() and (full == DIRECTION_COLORS[d]).all()
        assert (frames[at][cover[at] == 1] == (255, 0, 0)).all()  # plain: red in every direction
    assert len(set(DIRECTION_COLORS)) == 4


def test_smaller_agent_covers_a_quarter_of_the_pixels(plain_run):
    frames, dirs, _ = plain_run
    small, dirs2, _ = rollout(SMALL, 4, ACTIONS)
    np.testing.assert_array_equal(dirs, dirs2)
    ratio = agent_mass(small) / agent_mass(frames)
    for d in range(4):
        assert ratio[dirs == d] == pytest.approx(0.25, abs=0.01)
    cov = agent_coverage(True).sum((1, 2)) / agent_coverage(False).sum((1, 2))
    np.testing.assert_allclose(cov, 0.25, atol=0.002)
    # Away from the agent's cell the two renderings agree.
    f = frames.astype(np.int64)
    away = (np.clip(f[..., 0] - f[..., 1], 0, None) == 0) & (small[..., 0] <= small[..., 1])
    np.testing.assert_array_equal(small[away], frames[away])


def shown_frames(env_id, seed, actions, video_dir, split="train"):
    """Index of the video frame behind the black pixels of each observation (clip 0 only), checked exactly."""
    plain = rollout(PLAIN, seed, actions)[0]
    frames = rollout(env_id, seed, actions, background_dir=video_dir, split=split)[0]
    shown = []
    for p, f in zip(plain, frames):
        black = (p == 0).all(-1)
        assert black.mean() > 0.2
        np.testing.assert_array_equal(f[~black], p[~black])  # agent, balls, goal, walls stay
        background = f[black]
        assert (background[:, 1:] == (20, 99)).all()  # clip 0, the first training video, in both splits
        assert (background[:, 0] == background[0, 0]).all()  # one frame fills the background
        shown.append(int(background[0, 0]))
    return np.array(shown)


def test_random_frames_changes_the_background_at_every_step(video_dir):
    n = len(indexed_clip(0))
    shown = shown_frames(RANDOM, 1, ACTIONS[:100], video_dir)
    assert (np.diff(shown) != 0).all()  # a new frame at every step
    assert (np.diff(shown) % n != 1).mean() > 0.8  # not played in order
    assert len(set(shown)) > n // 2  # spread over the clip
    np.testing.assert_array_equal(shown_frames(RANDOM, 1, ACTIONS[:20], video_dir, split="eval"), shown[:21])


def test_video_advances_one_frame_per_step_from_a_random_start(video_dir):
    n = len(indexed_clip(0))
    shown = shown_frames(VIDEO, 1, ACTIONS[:100], video_dir)  # goals and collisions happen on the way
    np.testing.assert_array_equal(shown, (shown[0] + np.arange(101)) % n)  # in order, looping at the end
    starts = {shown_frames(VIDEO, seed, [], video_dir)[0] for seed in range(8)}
    assert len(starts) >= 4  # each reset starts at a random frame


def put_agent(env, pos, direction):
    """Move the agent of the minigrid env inside `env` to `pos` facing `direction` (a ball there moves away)."""
    inner = env._env
    cell = inner.grid.get(*pos)
    if cell is not None and cell.type == "ball":
        inner.grid.set(*pos, None)
        inner.place_obj(cell, max_tries=100)
    inner.agent_pos, inner.agent_dir = pos, direction


def test_return_counts_goals_minus_collisions_and_the_episode_goes_on():
    """Scripted: three goals, a wall bump and a ball collision, then turning in place: return 3 - 2 = 1."""
    env = make_env(PLAIN, 0)
    env.reset(seed=0)
    LEFT, FORWARD, EAST, NORTH = 0, 2, 0, 3
    rewards = []
    for _ in range(3):  # the goal is the cell (4, 4): stand west of it, facing east
        put_agent(env, (3, 4), EAST)
        obs, r, term, trunc, _ = env.step(FORWARD)
        rewards.append(r)
        assert not term and not trunc
        inner = env._env
        assert inner.step_count == 0 and tuple(inner.agent_pos) != (4, 4)  # a new layout, the episode goes on
        np.testing.assert_array_equal(obs, env._observe())  # and the observation shows it
    put_agent(env, (1, 1), NORTH)  # the wall is in front: minigrid counts walking into it as a collision
    rewards.append(env.step(FORWARD)[1])
    put_agent(env, (2, 2), EAST)
    inner = env._env
    if inner.grid.get(3, 2) is None:  # put a ball in front of the agent
        ball = inner.obstacles[0]
        inner.grid.set(*ball.cur_pos, None)
        inner.grid.set(3, 2, ball)
        ball.cur_pos = (3, 2)
    assert inner.grid.get(3, 2).type == "ball"
    rewards.append(env.step(FORWARD)[1])  # the ball was in front before the balls moved: a collision
    while True:
        obs, r, term, trunc, info = env.step(LEFT)
        rewards.append(r)
        assert not term
        if trunc:
            break
    assert rewards[:5] == [1.0, 1.0, 1.0, -1.0, -1.0] and set(rewards[5:]) == {0.0}
    assert len(rewards) == 100 and info["episode"] == {"r": 1.0, "l": 100}


def test_horizon_is_100_steps_and_episodes_never_terminate():
    env = make_env(PLAIN, 3)
    rng = np.random.default_rng(3)
    for _ in range(3):
        env.reset()
        rewards = []
        for t in range(1, 101):
            _, r, term, trunc, info = env.step(rng.integers(3))
            rewards.append(r)
            assert not term and trunc == (t == 100)
        assert info["episode"] == {"r": sum(rewards), "l": 100} and set(rewards) <= {-1.0, 0.0, 1.0}
        assert -1.0 in rewards  # random walks bump into walls
    # Action repeat 2: 50 agent steps of 2 frames; the vector env resets on the step after the last one.
    envs = make_vector_env(PLAIN, 1, seed=0, action_repeat=2)
    envs.reset(seed=0)
    ends = [t for t in range(1, 103) if envs.step(np.array([1]))[3][0]]
    assert ends == [50, 101]
    envs.close()


@pytest.mark.parametrize("env_id", list(MINIGRID_IDS))
def test_same_seed_same_frames(env_id, video_dir):
    options = dict(background_dir=video_dir) if env_id in (RANDOM, VIDEO) else {}
    actions = ACTIONS[:120]  # more than one episode: the second reset continues the generators

    def frames(seed, reseed=None):
        env = make_env(env_id, seed, **options)
        out = [env.reset(seed=reseed)[0]]
        for i, a in enumerate(actions):
            obs, _, _, trunc, _ = env.step(a)
            out.append(obs)
            if trunc:
                out.append(env.reset()[0])
        return np.stack(out)

    first = frames(5)
    np.testing.assert_array_equal(first, frames(5))
    assert (first != frames(6)).any()
    # reset(seed=5) reseeds the layouts, the obstacle moves and the video, whatever the env was built with
    np.testing.assert_array_equal(frames(5, reseed=5), frames(9, reseed=5))


def test_bad_ids_and_options_give_one_line_errors():
    for bad in (f"{MINIGRID_BASE}-colour-direction", "minigrid-dynamic-obstacles-8x8", "MiniGrid-Dynamic-Obstacles-6x6-v0"):
        with pytest.raises(ValueError) as e:
            make_env(bad, 0)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"--env-id {bad!r}") and f"'{MINIGRID_BASE}[-rendering]'" in msg
    assert "did you mean minigrid-dynamic-obstacles-6x6-color-direction" in str(  # the closest id first
        pytest.raises(ValueError, make_env, f"{MINIGRID_BASE}-colour-direction", 0).value)
    for options, flag in ((dict(background="natural"), "--background"), (dict(background_mask="segmentation"),
                          "--background-mask"), (dict(background_dir="/tmp"), "--background-dir"),
                          (dict(time_limit=0), "--time-limit"), (dict(action_repeat=0), "--action-repeat")):
        with pytest.raises(ValueError, match=f"^{flag} "):
            make_env(PLAIN, 0, **options)
    with pytest.raises(ValueError, match="--background-dir"):
        make_env(VIDEO, 0, background_dir="/no/such/folder")
    env = make_env(PLAIN, 0)
    env.reset()
    for action in (3, -1, 0.7, np.array([0.2, 0.1])):  # a continuous agent's output is refused, not rounded
        with pytest.raises(ValueError, match="integers 0 .left., 1 .right., 2 .forward."):
            env.step(action)


def test_bad_minigrid_id_stops_a_script_with_one_line(tmp_path):
    line = assert_cli_error("dreamerv3.py", tmp_path, ["--env-id", f"{MINIGRID_BASE}-colour"],
                            "--env-id 'minigrid-dynamic-obstacles-6x6-colour' is not")
    assert "minigrid-dynamic-obstacles-6x6-color-direction" in line  # the closest ids are suggested
    assert not (tmp_path / "runs").exists()  # before any heavy work


def test_smoke_cli_dreamerv3_on_a_rendering(tmp_path):
    """dreamerv3.py through its command line on color_direction: one-hot actions, 100-step episodes, finite losses."""
    flags = dict(deter=16, units=16, stoch=4, classes=4, cnn_depth=2, mlp_layers=1, batch_size=2, batch_length=8,
                 imag_horizon=3, train_ratio=8, buffer_size=2000, env_id=COLOR, num_envs=1, total_timesteps=200,
                 eval_every=10**6, eval_episodes=1, log_every=100, video_every=0)
    final, run_dir, ea = run_cli("dreamerv3.py", tmp_path, flags)
    assert math.isfinite(final["final_eval_return"]) and final["global_step"] == 200 and final["updates"] > 10
    assert_finite_scalars(ea, ("losses/reward", "losses/kl_dyn", "losses/actor", "losses/critic",
                               "charts/episodic_return"))
    assert [e.value for e in ea.Scalars("charts/episodic_length")] == [100, 100]  # one frame per action
    args = json.load(open(os.path.join(run_dir, "args.json")))
    assert (args["action_repeat"], args["time_limit"]) == (1, 100)  # the env's own, left unset on the command line
