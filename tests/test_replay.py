"""Replay buffer: contiguity, is_first placement, FIFO wrap-around, stream separation, alignment, memory."""

import gymnasium as gym
import numpy as np
import pytest

from common.replay import ReplayBuffer


def fill(buf, steps, episode_len=None):
    """Write `steps` rows; obs = (stream, global time), action = time + 0.5, first row of each episode flagged."""
    for t in range(steps):
        envs = np.arange(buf.num_envs)
        obs = np.stack([envs, np.full_like(envs, t)], 1)
        first = np.full(buf.num_envs, episode_len is not None and t % episode_len == 0 or t == 0)
        buf.add(obs, np.full((buf.num_envs, 1), t + 0.5), np.full(buf.num_envs, float(t)), first, np.zeros(buf.num_envs, bool))


def test_sequences_are_contiguous_and_within_one_stream():
    buf = ReplayBuffer(300, num_envs=3, obs_shape=(2,), action_dim=1, obs_dtype=np.int64, seed=0)
    fill(buf, 60)
    batch = buf.sample(256, 10)
    assert batch["obs"].shape == (256, 10, 2) and batch["action"].shape == (256, 10, 1)
    stream, time = batch["obs"][..., 0], batch["obs"][..., 1]
    assert (stream == stream[:, :1]).all()  # never mixes two envs' streams
    assert (np.diff(time, axis=1) == 1).all()  # contiguous
    assert set(np.unique(stream)) == {0, 1, 2}
    np.testing.assert_array_equal(batch["action"][..., 0], time + 0.5)
    np.testing.assert_array_equal(batch["reward"], time)


def test_start_points_are_uniform_over_valid_windows():
    buf = ReplayBuffer(40, num_envs=2, obs_shape=(2,), action_dim=1, obs_dtype=np.int64, seed=1)
    fill(buf, 12)  # 12 rows per stream, windows of 5 -> starts 0..7 in each of 2 streams = 16 windows
    starts = buf.sample(16000, 5)["obs"][:, 0]
    keys = starts[:, 0] * 100 + starts[:, 1]
    values, counts = np.unique(keys, return_counts=True)
    assert len(values) == 16 and starts[:, 1].max() == 7
    assert counts.min() > 800 and counts.max() < 1200  # expected 1000 each


def test_fifo_wraparound_keeps_the_newest_rows_and_never_crosses_the_write_head():
    buf = ReplayBuffer(20, num_envs=2, obs_shape=(2,), action_dim=1, obs_dtype=np.int64, seed=2)
    fill(buf, 27)  # 10 rows per stream: only times 17..26 survive
    assert len(buf) == 20 and buf.head == 27 % 10
    time = buf.sample(4000, 4)["obs"][..., 1]
    assert time.min() == 17 and time.max() == 26
    assert (np.diff(time, axis=1) == 1).all()  # a window across the head would jump from 26 back to 17
    assert set(time[:, 0]) == set(range(17, 24))  # every valid start (17..23) is drawn


def test_is_first_marks_episode_starts_inside_sequences():
    buf = ReplayBuffer(200, num_envs=1, obs_shape=(2,), action_dim=1, obs_dtype=np.int64, seed=3)
    fill(buf, 100, episode_len=7)
    batch = buf.sample(500, 16)
    np.testing.assert_array_equal(batch["is_first"], batch["obs"][..., 1] % 7 == 0)
    assert batch["is_first"][:, 1:].any()  # sequences do cross episode boundaries


def test_within_episode_windows_start_no_new_episode_after_the_first_row():
    buf = ReplayBuffer(200, num_envs=2, obs_shape=(2,), action_dim=1, obs_dtype=np.int64, seed=4)
    fill(buf, 100, episode_len=5)
    batch = buf.sample(2000, 4, within_episode=True)
    assert not batch["is_first"][:, 1:].any()
    assert set(batch["obs"][:, 0, 1] % 5) == {0, 1}  # starts at episode offsets 0 and 1 only
    with pytest.raises(RuntimeError, match="inside one episode"):
        buf.sample(10, 6, within_episode=True)


def test_sampling_more_steps_than_stored_is_an_error():
    buf = ReplayBuffer(100, num_envs=2, obs_shape=(2,), action_dim=1, obs_dtype=np.int64)
    fill(buf, 5)
    with pytest.raises(ValueError, match="5 rows"):
        buf.sample(4, 6)


class CountingEnv(gym.Env):
    """obs = steps taken in this episode; reward = 10 * obs before the step + action; 3 steps per episode."""

    observation_space = gym.spaces.Box(0, 100, (1,), np.float32)
    action_space = gym.spaces.Box(0, 1, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        reward = 10.0 * self.t + float(action[0])
        self.t += 1
        return np.array([self.t], np.float32), reward, self.t == 3, False, {}


def test_alignment_convention_with_the_documented_loop():
    """Row t holds o_t, the reward and flags on arriving at o_t, and the action chosen at o_t."""
    envs = gym.vector.SyncVectorEnv([CountingEnv] * 2, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    buf = ReplayBuffer(100, num_envs=2, obs_shape=(1,), action_dim=1, obs_dtype=np.float32)
    rng = np.random.default_rng(0)
    obs, _ = envs.reset(seed=0)
    reward, is_first, is_terminal, done = np.zeros(2), np.ones(2, bool), np.zeros(2, bool), np.zeros(2, bool)
    for _ in range(12):
        action = rng.uniform(0, 1, (2, 1)).astype(np.float32)
        buf.add(obs, action, reward, is_first, is_terminal)
        obs, reward, term, trunc, _ = envs.step(action)
        # NEXT_STEP autoreset: the step after the one that ended an episode returns a reset obs
        is_first, is_terminal, done = done, term, term | trunc
    o, a, r = buf.obs[0, :12, 0], buf.action[0, :12, 0], buf.reward[0, :12]
    first, term = buf.is_first[0, :12], buf.is_terminal[0, :12]
    np.testing.assert_array_equal(o, [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3])  # the last obs of each episode is kept
    np.testing.assert_array_equal(first, o == 0)
    np.testing.assert_array_equal(term, o == 3)
    for t in range(1, 12):  # r_t follows a_{t-1} taken at o_{t-1}; 0 on the first row of an episode
        expected = 0.0 if first[t] else 10.0 * o[t - 1] + a[t - 1]
        assert r[t] == pytest.approx(expected, abs=1e-6)


def test_memory_stays_within_five_percent_of_the_raw_frames():
    cap, num_envs = 20_000, 4
    buf = ReplayBuffer(cap, num_envs, obs_shape=(3, 64, 64), action_dim=6, check_memory=False)
    raw = cap * 3 * 64 * 64
    assert raw <= buf.nbytes <= 1.05 * raw
    assert buf.obs.dtype == np.uint8 and buf.obs.shape == (num_envs, cap // num_envs, 3, 64, 64)


def test_a_buffer_the_machine_cannot_hold_fails_clearly():
    with pytest.raises(MemoryError, match="--buffer-size"):
        ReplayBuffer(10**12, 4, obs_shape=(3, 64, 64), action_dim=6)
    with pytest.raises(ValueError, match="--buffer-size"):
        ReplayBuffer(2, 4, obs_shape=(1,), action_dim=1)


def test_memmap_replay_survives_the_process(tmp_path):
    """path=: the arrays are files; a new buffer opened with resume=True and the saved state_dict samples the
    same windows with the same values, and a file of the wrong size is refused naming it."""
    buf = ReplayBuffer(60, num_envs=2, obs_shape=(2,), action_dim=1, obs_dtype=np.int64, seed=3, path=str(tmp_path))
    fill(buf, 20, episode_len=7)
    buf.flush()
    state = buf.state_dict()
    again = ReplayBuffer(60, num_envs=2, obs_shape=(2,), action_dim=1, obs_dtype=np.int64, path=str(tmp_path),
                         resume=True)
    again.load_state_dict(state)
    a, b = buf.sample(8, 5), again.sample(8, 5)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert len(again) == 40 and again.head == 20
    with pytest.raises(ValueError, match="obs.bin"):
        ReplayBuffer(80, num_envs=2, obs_shape=(2,), action_dim=1, obs_dtype=np.int64, path=str(tmp_path), resume=True)


def test_check_capacity_refuses_before_creating_anything(tmp_path):
    """The scripts' early check: the bytes are the buffer's own, an oversized buffer is refused naming
    --buffer-size, and nothing is created on disk to find that out."""
    from common.replay import check_capacity

    need = check_capacity(100, 2, (3, 4, 4), action_dim=2)
    buf = ReplayBuffer(100, 2, (3, 4, 4), 2)
    assert need == buf.nbytes == 100 * (48 + 8 + 4 + 1 + 1)
    path = tmp_path / "run" / "replay"
    with pytest.raises(MemoryError, match="--buffer-size 100000000000"):
        check_capacity(100_000_000_000, 1, (3, 64, 64), path=str(path))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="--buffer-size"):
        check_capacity(1, 2, (3,))
