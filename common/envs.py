"""Environments shared by every agent script: one entry point, `make_env(env_id, seed, **options)`.

Two families of environment ids:

* DeepMind Control from pixels, ids `domain-task` as in the papers (`walker-run`, `cup-catch`,
  `ball_in_cup-catch`, `finger-turn_hard`, ...). Observations are uint8 images of shape (3, 64, 64)
  (channels first), actions lie in [-1, 1], each action is repeated `action_repeat` times (default 2)
  with the rewards summed, and an episode is cut after `time_limit` environment frames (default 1000,
  so 500 agent steps). Camera 2 for quadruped and 0 otherwise (the Dreamer convention).
  Frames are counted after action repeat: `info["episode"]["l"]` is in environment frames.
* gymnasium's own MuJoCo tasks from states (`HalfCheetah-v5`, `Hopper-v5`, `Walker2d-v5`, `Ant-v5`,
  `Humanoid-v5`, `InvertedPendulum-v5`, ...) passed through with the same episode statistics, plus the
  truncated-observation variants of ALM's Table 1 (`AntTruncatedObs-v5`, `HumanoidTruncatedObs-v5`).

Every env reports `info["episode"] = {"r": return, "l": length in frames}` on the step that ends an
episode. `make_vector_env` builds `num_envs` copies (in subprocesses when `num_envs > 1`) with
gymnasium's NEXT_STEP autoreset: the step after an episode ends ignores its action and returns the
first observation of the next episode with reward 0 (see `make_vector_env`).

Rendering uses `MUJOCO_GL=egl` (headless) unless the user has chosen a backend.
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering unless the user chose a backend

import gymnasium as gym
import numpy as np

# The 20 tasks of the Visual Control Suite (MuDreamer Table 1, DreamerV3's DMC vision benchmark).
TABLE1_TASKS = (
    "acrobot-swingup", "cartpole-balance", "cartpole-balance_sparse", "cartpole-swingup",
    "cartpole-swingup_sparse", "cheetah-run", "cup-catch", "finger-spin", "finger-turn_easy",
    "finger-turn_hard", "hopper-hop", "hopper-stand", "pendulum-swingup", "quadruped-run",
    "quadruped-walk", "reacher-easy", "reacher-hard", "walker-run", "walker-stand", "walker-walk",
)
DMC_DOMAIN_ALIASES = {"cup": "ball_in_cup"}  # the papers write "cup-catch"

# gymnasium MuJoCo tasks from states. The truncated variants drop the contact forces (and for Humanoid
# the COM inertia/velocity and actuator forces) from the observation, as MBPO's AntTruncatedObs and
# HumanoidTruncatedObs (27 and 45 dims) used by ALM Table 1, through gymnasium v5's keyword options.
GYM_TRUNCATED = {
    "AntTruncatedObs-v5": ("Ant-v5", dict(include_cfrc_ext_in_observation=False)),
    "HumanoidTruncatedObs-v5": (
        "Humanoid-v5",
        dict(include_cinert_in_observation=False, include_cvel_in_observation=False,
             include_qfrc_actuator_in_observation=False, include_cfrc_ext_in_observation=False),
    ),
}
GYM_MUJOCO_IDS = (
    "HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "Ant-v5", "Humanoid-v5", "InvertedPendulum-v5",
    "InvertedDoublePendulum-v5", "Reacher-v5", "Swimmer-v5", "Pusher-v5", *GYM_TRUNCATED,
)

# Background options of the DMC pixel envs. "plain" is DMC's own skybox and floor.
BACKGROUNDS = ("plain",)


def dmc_env_ids() -> list[str]:
    """All DMC ids `domain-task` that `make_env` accepts (the suite's benchmark tasks plus aliases)."""
    from dm_control import suite

    ids = [f"{d}-{t}" for d, t in suite.ALL_TASKS]
    ids += [f"{alias}-{t}" for alias, d in DMC_DOMAIN_ALIASES.items() for dd, t in suite.ALL_TASKS if dd == d]
    return sorted(ids)


def valid_env_ids() -> list[str]:
    return dmc_env_ids() + list(GYM_MUJOCO_IDS)


def _unknown_id(env_id: str) -> ValueError:
    return ValueError(
        f"--env-id {env_id!r} is not a known environment. DMC pixel tasks are written 'domain-task', "
        f"gymnasium MuJoCo tasks by their gymnasium id. Valid ids: {', '.join(valid_env_ids())}"
    )


def is_dmc(env_id: str) -> bool:
    """True for a DMC pixel id (`domain-task`), False for a gymnasium id; raises for anything else."""
    if env_id in GYM_MUJOCO_IDS:
        return False
    if env_id.count("-") != 1:
        raise _unknown_id(env_id)
    domain, task = env_id.split("-")
    from dm_control import suite

    if (DMC_DOMAIN_ALIASES.get(domain, domain), task) not in suite.ALL_TASKS:
        raise _unknown_id(env_id)
    return True


class DMCPixelEnv(gym.Env):
    """A DMC task as a gymnasium env with 3x64x64 uint8 observations and summed action-repeat rewards.

    `terminated` is True only when the task ends with discount 0 (no task of the suite does this);
    reaching `time_limit` frames is a truncation, so agents should bootstrap through it.
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, env_id: str, seed: int, action_repeat: int = 2, size: int = 64,
                 time_limit: int = 1000, camera: int | None = None, background: str = "plain",
                 background_dir: str | None = None, background_mask: str = "color", split: str = "train"):
        from dm_control import suite

        if action_repeat < 1:
            raise ValueError(f"--action-repeat must be >= 1, got {action_repeat}")
        if size < 1 or time_limit < 1:
            raise ValueError(f"image size and time limit must be positive, got {size} and {time_limit}")
        if background not in BACKGROUNDS:
            raise ValueError(f"--background {background!r} is not supported; choose one of {BACKGROUNDS}")
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        domain, task = env_id.split("-")
        domain = DMC_DOMAIN_ALIASES.get(domain, domain)
        # The frame budget is ours (time_limit); DMC's own 1000-step limit is switched off.
        self._env = suite.load(domain, task, task_kwargs={"random": seed, "time_limit": float("inf")})
        self.action_repeat, self.size, self.time_limit = action_repeat, size, time_limit
        self.camera = camera if camera is not None else (2 if domain == "quadruped" else 0)
        spec = self._env.action_spec()
        self._act_low, self._act_high = spec.minimum.astype(np.float64), spec.maximum.astype(np.float64)
        self.observation_space = gym.spaces.Box(0, 255, (3, size, size), np.uint8)
        self.action_space = gym.spaces.Box(-1.0, 1.0, spec.shape, np.float32)
        self.render_mode = "rgb_array"
        self._frames, self._return, self._last = 0, 0.0, None

    def _observe(self) -> np.ndarray:
        frame = self._env.physics.render(self.size, self.size, camera_id=self.camera)  # (H, W, 3) uint8
        self._last = frame
        return np.ascontiguousarray(frame.transpose(2, 0, 1))  # (3, H, W)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._env.task.random.seed(seed)
        self._env.reset()
        self._frames, self._return = 0, 0.0
        return self._observe(), {}

    def step(self, action):
        action = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
        action = self._act_low + (action + 1.0) * 0.5 * (self._act_high - self._act_low)
        reward, terminated = 0.0, False
        for _ in range(self.action_repeat):
            ts = self._env.step(action)
            reward += ts.reward or 0.0
            self._frames += 1
            if ts.last():
                terminated = ts.discount == 0.0
                break
            if self._frames >= self.time_limit:
                break
        truncated = not terminated and self._frames >= self.time_limit
        self._return += reward
        info = {}
        if terminated or truncated:
            info["episode"] = {"r": self._return, "l": self._frames}
        return self._observe(), float(reward), bool(terminated), bool(truncated), info

    def render(self) -> np.ndarray:
        """The last observation as (H, W, 3) uint8."""
        return self._last

    def close(self):
        self._env.close() if hasattr(self._env, "close") else None


class GymEpisodeStats(gym.Wrapper):
    """Adds `info["episode"] = {"r", "l"}` at the end of an episode, as the DMC env does."""

    def reset(self, **kwargs):
        self._return, self._length = 0.0, 0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._return += float(reward)
        self._length += 1
        if terminated or truncated:
            info = dict(info, episode={"r": self._return, "l": self._length})
        return obs, reward, terminated, truncated, info


def make_env(env_id: str, seed: int, **options) -> gym.Env:
    """Build one environment.

    DMC options: action_repeat, size, time_limit, camera, and the background options background
    ("plain" or natural videos), background_dir, background_mask, split ("train" for training envs,
    "eval" for evaluation envs, which draw backgrounds from the evaluation video set).

    gymnasium ids accept no options (they are the tasks as gymnasium defines them, time limit included).
    """
    if is_dmc(env_id):
        try:
            return DMCPixelEnv(env_id, seed, **options)
        except TypeError as e:
            raise TypeError(f"make_env({env_id!r}): {e}") from None
    background = options.pop("background", "plain")
    if background != "plain":
        raise ValueError(f"--background {background!r} applies to DMC pixel tasks only, not {env_id}")
    for key in ("background_dir", "background_mask", "split"):  # harmless with a plain background
        options.pop(key, None)
    if options:
        raise TypeError(f"make_env({env_id!r}) takes no options for gymnasium tasks, got {sorted(options)}")
    base_id, kwargs = GYM_TRUNCATED.get(env_id, (env_id, {}))
    env = GymEpisodeStats(gym.make(base_id, **kwargs))
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


def make_vector_env(env_id: str, num_envs: int, seed: int, **options) -> gym.vector.VectorEnv:
    """`num_envs` copies with seeds seed, seed+1, ...; in subprocesses when num_envs > 1.

    Autoreset is gymnasium's NEXT_STEP mode, chosen on purpose: the step that ends an episode returns
    its last observation (terminated/truncated set, `info["episode"]` filled); the following step
    ignores its action and returns the first observation of a new episode with reward 0. The agents
    store every returned observation and mark that first one `is_first`.
    """
    if num_envs < 1:
        raise ValueError(f"--num-envs must be >= 1, got {num_envs}")
    is_dmc(env_id)  # fail here, in the parent, on a bad id
    fns = [functools.partial(make_env, env_id, seed + i, **options) for i in range(num_envs)]
    mode = gym.vector.AutoresetMode.NEXT_STEP
    if num_envs == 1:
        return gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)
    # spawn, not fork: forking a process that already holds a GL context or OpenMP threads can hang.
    return gym.vector.AsyncVectorEnv(fns, context="spawn", autoreset_mode=mode)
