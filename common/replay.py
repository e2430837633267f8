"""The small replay buffer every agent shares: `num_envs` parallel streams, each frame stored once.

Alignment convention (one sentence): row t of a stream holds the observation o_t, the reward r_t and
the flags is_first_t / is_terminal_t received on arriving at o_t, and the action a_t the agent then
chose at o_t (so a model that consumes a_{t-1} reads `action[:, t-1]`, and r_t follows a_{t-1}).

On the first row of an episode the reward is 0 and is_first is True. The last observation of an
episode is stored with the action that the vector env ignored (NEXT_STEP autoreset, see
`common.envs.make_vector_env`); it never matters because the next row starts a new episode.
The loop that produces this layout with a NEXT_STEP vector env:

    obs, _ = envs.reset(seed=seed)
    reward, is_first, is_terminal, done = zeros, ones, zeros, zeros    # one entry per env
    while ...:
        action = policy(obs, is_first)
        replay.add(obs, action, reward, is_first, is_terminal)
        obs, reward, terminated, truncated, infos = envs.step(action)
        is_first, is_terminal, done = done, terminated, terminated | truncated

Memory: observations dominate. 1e6 frames of 3x64x64 uint8 are 12.3 GB (plus 4 bytes per action
dimension and 6 bytes of reward and flags per step: 12.3 GB for a 6-dim action at the default 1e6).
The arrays are allocated once, lazily by the OS, so a short run touches only what it writes, but the
constructor refuses a capacity the machine's available memory cannot hold (pass a smaller
`--buffer-size`).

Checkpoints (`path=`): the arrays are then memory-mapped files in that folder (`np.memmap`, one file per
field), so the replay survives the process without a second copy in memory and without rewriting it at every
checkpoint: `flush()` writes the dirty pages back and `state_dict()` is only the write head, the row count and
the sampling RNG (a few hundred bytes, stored in the agent's checkpoint). The files are created at full size
(sparse where the file system allows), so the constructor refuses a capacity the disk cannot hold: the same
12.3 GB for a 1e6-step pixel replay. `resume=True` opens existing files, which must have exactly the shapes
asked for. After a kill the files may hold rows written after the last checkpoint: before the buffer has
wrapped they lie beyond the restored count and are overwritten before they can be sampled; once it has
wrapped they stand in for the oldest rows (real transitions of the lost stretch, one seam without an episode
start), at most one checkpoint interval of them.
"""

from __future__ import annotations

import os
import shutil

import numpy as np


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where that file does not exist."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def replay_fields(capacity: int, num_envs: int, obs_shape: tuple, action_dim: int, obs_dtype=np.uint8) -> dict:
    """name -> (shape, dtype) of every array the buffer holds."""
    shape = (num_envs, capacity // max(num_envs, 1))
    return {"obs": (shape + tuple(obs_shape), obs_dtype), "action": (shape + (action_dim,), np.float32),
            "reward": (shape, np.float32), "is_first": (shape, bool), "is_terminal": (shape, bool)}


def check_capacity(capacity: int, num_envs: int, obs_shape: tuple, action_dim: int = 1, obs_dtype=np.uint8,
                   path: str | None = None, check_memory: bool = True, resume: bool = False) -> int:
    """Bytes the buffer needs; ValueError or MemoryError naming --buffer-size when it cannot be held: in memory
    (path None) or on the disk that would hold `path`. Creates nothing, so scripts call it before building
    anything (action_dim 1 there: the frames dominate)."""
    if num_envs < 1 or capacity < num_envs:
        raise ValueError(f"--buffer-size ({capacity}) must be >= --num-envs ({num_envs}) >= 1")
    need = sum(int(np.prod(s)) * np.dtype(d).itemsize
               for s, d in replay_fields(capacity, num_envs, obs_shape, action_dim, obs_dtype).values())
    if path is None:
        avail = available_memory_bytes()
        if check_memory and avail is not None and need > avail:
            raise MemoryError(f"the replay buffer needs {need / 1e9:.1f} GB for --buffer-size {capacity} but only "
                              f"{avail / 1e9:.1f} GB of memory are available; pass a smaller --buffer-size")
    elif not resume:
        existing = os.path.abspath(path)
        while not os.path.exists(existing):  # the nearest folder that exists: nothing is created to ask
            existing = os.path.dirname(existing)
        free = shutil.disk_usage(existing).free
        if need > free:
            raise MemoryError(f"the replay buffer needs {need / 1e9:.1f} GB of disk in {path} for --buffer-size "
                              f"{capacity} (checkpoints keep it on disk) but only {free / 1e9:.1f} GB are free; pass "
                              f"a smaller --buffer-size or --checkpoint-every 0")
    return need


class ReplayBuffer:
    """FIFO over `capacity` steps in total (`capacity // num_envs` per stream), written in lockstep.

    `add` takes one row per stream; `sample(B, T)` returns contiguous (B, T) windows drawn uniformly
    over the valid start points (inside one stream, never across the write head); `sample(B, T,
    within_episode=True)` additionally rejects windows in which a new episode starts after the first
    row (ALM's (B, K+1) sequences).
    """

    def __init__(self, capacity: int, num_envs: int, obs_shape: tuple, action_dim: int,
                 obs_dtype=np.uint8, seed: int = 0, check_memory: bool = True, path: str | None = None,
                 resume: bool = False):
        self.num_envs, self.cap = num_envs, capacity // max(num_envs, 1)
        fields = replay_fields(capacity, num_envs, obs_shape, action_dim, obs_dtype)
        check_capacity(capacity, num_envs, obs_shape, action_dim, obs_dtype, path=path,
                       check_memory=check_memory, resume=resume)
        self.path = path
        if path is None:
            for name, (s, d) in fields.items():
                setattr(self, name, np.empty(s, d))
        else:
            os.makedirs(path, exist_ok=True)
            files = {name: os.path.join(path, f"{name}.bin") for name in fields}
            if resume:
                for name, (s, d) in fields.items():
                    size = os.path.getsize(files[name]) if os.path.exists(files[name]) else None
                    if size != int(np.prod(s)) * np.dtype(d).itemsize:
                        raise ValueError(f"{files[name]}: replay file missing or of the wrong size ({size} bytes) "
                                         f"for --buffer-size {capacity} and --num-envs {num_envs}")
            for name, (s, d) in fields.items():
                setattr(self, name, np.memmap(files[name], dtype=d, mode="r+" if resume else "w+", shape=s))
        self.head = 0  # next write position in every stream (the oldest row once full)
        self.count = 0  # rows written per stream, capped at self.cap
        self.rng = np.random.default_rng(seed)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.obs, self.action, self.reward, self.is_first, self.is_terminal))

    def flush(self) -> None:
        """Write a memory-mapped replay's dirty pages to its files (a no-op in memory)."""
        if self.path is not None:
            for a in (self.obs, self.action, self.reward, self.is_first, self.is_terminal):
                a.flush()

    def state_dict(self) -> dict:
        """What a checkpoint needs besides the arrays: write head, rows per stream, sampling RNG."""
        return {"head": self.head, "count": self.count, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.head, self.count = int(state["head"]), int(state["count"])
        self.rng.bit_generator.state = state["rng"]

    def __len__(self) -> int:
        """Steps stored, over all streams."""
        return self.count * self.num_envs

    def add(self, obs, action, reward, is_first, is_terminal) -> None:
        """Write one row per stream; each argument has a leading (num_envs,) axis."""
        h = self.head
        self.obs[:, h] = obs
        self.action[:, h] = action
        self.reward[:, h] = reward
        self.is_first[:, h] = is_first
        self.is_terminal[:, h] = is_terminal
        self.head = (h + 1) % self.cap
        self.count = min(self.count + 1, self.cap)

    def _windows(self, batch_size: int, seq_len: int):
        """Stream and physical time indices (B,), (B, T) of uniform valid windows."""
        if not 1 <= seq_len <= self.count:
            raise ValueError(f"cannot sample sequences of {seq_len} steps from {self.count} rows per stream")
        env = self.rng.integers(0, self.num_envs, batch_size)
        start = self.rng.integers(0, self.count - seq_len + 1, batch_size)  # logical: 0 = oldest row
        if self.count == self.cap:
            start = start + self.head  # the oldest row sits at the write head once the buffer is full
        return env, (start[:, None] + np.arange(seq_len)) % self.cap

    def sample(self, batch_size: int, seq_len: int, within_episode: bool = False) -> dict:
        """A dict of numpy arrays: obs (B, T, *obs_shape), action (B, T, A), reward, is_first, is_terminal (B, T)."""
        env, t = self._windows(batch_size, seq_len)
        if within_episode:
            for _ in range(1000):
                bad = self.is_first[env[:, None], t[:, 1:]].any(1)
                if not bad.any():
                    break
                e2, t2 = self._windows(int(bad.sum()), seq_len)
                env[bad], t[bad] = e2, t2
            else:
                raise RuntimeError(f"found no {seq_len}-step windows inside one episode in the replay buffer")
        e = env[:, None]
        return dict(obs=self.obs[e, t], action=self.action[e, t], reward=self.reward[e, t],
                    is_first=self.is_first[e, t], is_terminal=self.is_terminal[e, t])
