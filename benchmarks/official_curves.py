"""The official DreamerV3's early learning curves as rows of benchmarks/paper_results.csv ("official curve").

    git show 2411f7d:scores/dmc_vision-dreamerv3.json.gz > dmc_vision.json.gz   # in a clone of danijar/dreamerv3
    python benchmarks/official_curves.py dmc_vision.json.gz finger-spin cheetah-run walker-walk

The file (not copied here) is a list of runs {task, method, seed, xs: frames, ys: returns}; its dmc_vision runs have
10 seeds per task, each curve starting at 8,002 frames. Each seed's curve is interpolated linearly at the frames
below, then the mean, min and max over seeds are printed as CSV rows to append to paper_results.csv.
"""

import gzip
import json
import sys

import numpy as np

FRAMES = (8002, 10_000, 15_000, 20_000, 25_000, 30_000)  # 8,002: the curves' first point
SOURCE = "DreamerV3 official scores (danijar/dreamerv3 2411f7d dmc_vision)"

if __name__ == "__main__":
    runs = json.load(gzip.open(sys.argv[1]))
    for env_id in sys.argv[2:]:
        seeds = [r for r in runs if r["task"] == "dmc_" + env_id.replace("-", "_")]
        ys = np.stack([np.interp(FRAMES, r["xs"], r["ys"]) for r in seeds])
        for f, mean, low, high in zip(FRAMES, ys.mean(0), ys.min(0), ys.max(0)):
            print(f"{SOURCE},official curve ({len(seeds)} seeds),plain,dreamerv3,{env_id},{f},{mean:.1f},,{low:.1f},"
                  f"{high:.1f}")
