"""Time one full training update per agent on a synthetic batch: median wall time after warm-up.

    python benchmarks/update_speed.py                      # every agent, CPU (or CUDA when present)
    python benchmarks/update_speed.py --agents dreamerv3 --device cpu --repeats 10
    python benchmarks/update_speed.py --agents dreamerv3 --precisions fp32 bf16 --size small   # side by side
    python benchmarks/update_speed.py --agents dreamerv3 --precisions fp32 bf16 --compile off on   # eager / compiled

Each agent has a module `benchmarks/bench_<agent>.py` with `setup(device) -> (step, description)`:
`step()` runs one full update at the paper configuration (world model + behaviour, or ALM's two phases)
on a synthetic batch already on `device`. Prints one line per agent. A module with `PRECISIONS` also takes
`setup(device, precision=..., size=...)`; then `--precisions` are timed side by side in one run, in alternating
rounds (one update of each per round, so load changes hit every variant alike), with the median ratios against the
first variant. With `--compile off on` every precision is also timed with `setup(..., compile=True)` (the script's
--compile); each compiled variant's first update, which compiles, is timed apart ("compile + first update") and
never counted in the median. Quote the thread settings with every number (e.g. OMP_NUM_THREADS,
torch.get_num_threads()); time on an idle machine.
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
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                   help="timed side by side (modules with PRECISIONS); ratios against the first")
    p.add_argument("--size", default="S", choices=["S", "small"], help="paper size or the learning checks' size")
    p.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"],
                   help="eager and/or the scripts' --compile, for every precision (modules with PRECISIONS)")
    a = p.parse_args()
    device = torch.device(a.device)
    print(f"# device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    for name in a.agents:
        mod = importlib.import_module(f"bench_{name}")
        if not hasattr(mod, "PRECISIONS"):
            if a.precisions != ["fp32"] or a.size != "S" or a.compile != ["off"]:
                print(f"{name:10s} skipped: no --precisions / --size variants", flush=True)
                continue
            step, desc = mod.setup(device)
            med, times = time_step(step, device, a.warmup, a.repeats)
            print(f"{name:10s} {med * 1e3:9.1f} ms/update (median of {a.repeats}, min {min(times) * 1e3:.1f}, "
                  f"max {max(times) * 1e3:.1f})  {desc}", flush=True)
            continue
        variants = {}
        for p in a.precisions:
            for c in a.compile:
                key = p + (" compiled" if c == "on" else "")
                variants[key] = (mod.setup(device, precision=p, size=a.size, compile=True) if c == "on"
                                 else mod.setup(device, precision=p, size=a.size))
                if c == "on":  # the first compiled update compiles: timed apart, not in the median
                    t0 = time.perf_counter()
                    variants[key][0]()
                    print(f"{name:10s} {key}: compile + first update {time.perf_counter() - t0:.1f} s", flush=True)
        first = next(iter(variants))
        times = {p: [] for p in variants}
        for r in range(a.warmup + a.repeats):  # alternating rounds
            for p, (step, _) in variants.items():
                _, t = time_step(step, device, 0, 1)
                if r >= a.warmup:
                    times[p] += t
        med = {p: statistics.median(t) for p, t in times.items()}
        for p, (_, desc) in variants.items():
            ratio = med[first] / med[p]
            print(f"{name:10s} {med[p] * 1e3:9.1f} ms/update (median of {a.repeats} alternating rounds, min "
                  f"{min(times[p]) * 1e3:.1f}, max {max(times[p]) * 1e3:.1f}; {ratio:.2f}x vs {first})  "
                  f"{desc}", flush=True)


if __name__ == "__main__":
    main()
