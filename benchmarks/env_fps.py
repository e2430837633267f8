"""Environment frames per second (after action repeat) with random actions.

    python benchmarks/env_fps.py --env-id walker-run --num-envs 1 --steps 500
    python benchmarks/env_fps.py --env-id walker-run --num-envs 4 --steps 500   # 4 envs in subprocesses
    python benchmarks/env_fps.py --env-id minigrid-dynamic-obstacles-6x6-video --steps 1000

Frames = agent steps x action repeat x num_envs; the first reset is not timed. Extra `--option k=v`
pairs go to make_env (e.g. --option background=natural).
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.envs import env_defaults, make_vector_env  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env-id", default="walker-run")
    p.add_argument("--num-envs", type=int, default=1)
    p.add_argument("--steps", type=int, default=500, help="vector steps to time")
    p.add_argument("--option", action="append", default=[], help="k=v passed to make_env")
    a = p.parse_args()
    options = dict(kv.split("=", 1) for kv in a.option)
    envs = make_vector_env(a.env_id, a.num_envs, seed=0, **options)
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    space = envs.single_action_space
    if hasattr(space, "n"):  # Discrete (MiniGrid)
        sample = lambda: rng.integers(0, space.n, a.num_envs)  # noqa: E731
    else:
        sample = lambda: rng.uniform(space.low, space.high, (a.num_envs,) + space.shape).astype(np.float32)  # noqa: E731
    repeat = int(options.get("action_repeat", env_defaults(a.env_id).get("action_repeat", 1)))
    t0 = time.perf_counter()
    for _ in range(a.steps):
        envs.step(sample())
    dt = time.perf_counter() - t0
    envs.close()
    print(f"{a.env_id} num_envs={a.num_envs} options={options}: {a.steps * a.num_envs * repeat / dt:.0f} frames/s "
          f"({a.steps} vector steps in {dt:.1f} s)")


if __name__ == "__main__":
    main()
