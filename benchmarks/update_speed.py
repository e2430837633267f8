"""Time one full training update per agent on a synthetic batch: median wall time after warm-up.

    python benchmarks/update_speed.py                      # every agent, CPU (or CUDA when present)
    python benchmarks/update_speed.py --agents dreamerv3 --device cpu --repeats 10

Each agent has a module `benchmarks/bench_<agent>.py` with `setup(device) -> (step, description)`:
`step()` runs one full update at the paper configuration (world model + behaviour, or ALM's two phases)
on a synthetic batch already on `device`. Prints one line per agent. Quote the thread settings with
every number (e.g. OMP_NUM_THREADS, torch.get_num_threads()); time on an idle machine.
"""

import argparse
import importlib
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]


def time_step(step, device, warmup, repeats):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main():
    found = sorted(f[6:-3] for f in os.listdir(HERE) if f.startswith("bench_") and f.endswith(".py"))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", nargs="*", default=found, choices=found)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    device = torch.device(a.device)
    print(f"# device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    for name in a.agents:
        step, desc = importlib.import_module(f"bench_{name}").setup(device)
        med, times = time_step(step, device, a.warmup, a.repeats)
        print(f"{name:10s} {med * 1e3:9.1f} ms/update (median of {a.repeats}, min {min(times) * 1e3:.1f}, "
              f"max {max(times) * 1e3:.1f})  {desc}", flush=True)


if __name__ == "__main__":
    main()
