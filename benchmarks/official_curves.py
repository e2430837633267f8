"""Official early learning curves as rows of benchmarks/paper_results.csv ("official curve").

    # DreamerV3 (the reference for dreamerv3.py, mudreamer.py, blast.py), in a clone of danijar/dreamerv3:
    git show 2411f7d:scores/dmc_vision-dreamerv3.json.gz > dmc_vision.json.gz
    python benchmarks/official_curves.py dmc_vision.json.gz finger-spin cheetah-run walker-walk
    # DreamerV2 (BLAST's base: the same RSSM with discrete latents, actor-critic and one update per 5 policy steps), in
    # a clone of danijar/dreamerv2:
    git show 07d906e:scores/dmc-vision-dreamerv2.json > dmc-vision-dreamerv2.json
    python benchmarks/official_curves.py dmc-vision-dreamerv2.json finger-spin cheetah-run walker-walk --agent dreamer-v2 \
        --source "DreamerV2 official scores (danijar/dreamerv2 07d906e scores/dmc-vision-dreamerv2.json)" \
        --frames 30000 60000 90000
    # Dreamer v1 (CVRL's base: the same RSSM, actor-critic and 100-updates-per-1000-frames schedule), in a clone of
    # danijar/dreamer:
    git show 56d4d44:scores/dreamer.json > dreamer.json
    python benchmarks/official_curves.py dreamer.json finger-spin cheetah-run walker-walk --agent dreamer-v1 \
        --source "Dreamer v1 official scores (danijar/dreamer 56d4d44 scores/dreamer.json)" --frames 5000 105000 205000

Each file (not copied here) is a list of runs {task, method, seed, xs: frames, ys: returns} (gzipped or plain JSON).
DreamerV3's dmc_vision runs have 10 seeds per task, each curve starting at 8,002 frames; DreamerV2's have 5 seeds,
evaluated every 30k frames from 30k; Dreamer v1's have 5 seeds, evaluated every 100k frames from 5k. Each seed's curve
is interpolated linearly at --frames (for DreamerV2 and Dreamer v1 the commands above ask for their own evaluation
points: nothing interpolated), then the mean, min and max over seeds are printed as CSV rows to append to
paper_results.csv.
"""

import argparse
import gzip
import json

import numpy as np

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scores", help="the score file (.json or .json.gz)")
    p.add_argument("env_ids", nargs="+")
    p.add_argument("--frames", type=int, nargs="+", default=[8002, 10_000, 15_000, 20_000, 25_000, 30_000],
                   help="where to read each curve (default: DreamerV3's first point 8,002, then every 5k to 30k)")
    p.add_argument("--agent", default="dreamerv3", help="the agent column of the rows")
    p.add_argument("--source", default="DreamerV3 official scores (danijar/dreamerv3 2411f7d dmc_vision)")
    a = p.parse_args()
    runs = json.load((gzip.open if a.scores.endswith(".gz") else open)(a.scores))
    for env_id in a.env_ids:
        seeds = [r for r in runs if r["task"] == "dmc_" + env_id.replace("-", "_")]
        ys = np.stack([np.interp(a.frames, r["xs"], r["ys"]) for r in seeds])
        for f, mean, low, high in zip(a.frames, ys.mean(0), ys.min(0), ys.max(0)):
            print(f"{a.source},official curve ({len(seeds)} seeds),plain,{a.agent},{env_id},{f},{mean:.1f},,{low:.1f},"
                  f"{high:.1f}")
