"""Learning curves and a table of final returns from the TensorBoard events of finished runs.

    python benchmarks/plot.py results/cartpole --out docs/results.png --table docs/results.md
    python benchmarks/plot.py runs/ results/ --band minmax

Every folder holding an `args.json` next to TensorBoard event files under the given folders is one run
(the scripts write both into `runs/{run_name}/`). Runs are grouped by agent (`exp_name` in args.json,
the script's name by default) and `env_id`; each panel (one per env id) draws `eval/episodic_return`
against frames: the mean over seeds as a line and a shaded band (`--band std`: mean +- one standard
deviation over seeds, ddof 0; `--band minmax`: the lowest and highest seed). Seeds are put on the
first seed's evaluation steps by linear interpolation, within the range every seed reached. The random
policy's return (MuDreamer Table 2, its "Random" column, measured with natural backgrounds) is a dashed
grey line and the paper's score of the agent (benchmarks/paper_results.csv) a star at the paper's
frame budget where it lies inside the plotted range, or at the panel's right edge (with the budget in
its label) where it does not. Rows of that file whose `table` starts with "official curve" are a published
learning curve (the official DreamerV3's own seeds, computed from its public score files): drawn in black,
the mean over its seeds dotted and their min-max band hatched, up to the panel's right edge. The table lists,
per group, the mean +- std (ddof 0) over seeds of the evaluation at the last frame every seed reached, the number
of seeds, and that frame.
"""

import argparse
import csv
import glob
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TAG = "eval/episodic_return"


def load_scalars(run_dir, tag=TAG):
    """(steps, values) of one scalar tag from the event files of a run folder (tensorboard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return np.zeros(0), np.zeros(0)
    events = acc.Scalars(tag)
    return np.array([e.step for e in events], float), np.array([e.value for e in events], float)


def find_runs(folders):
    """One dict per run folder below `folders`: agent, env_id, seed, setting, steps, values."""
    runs = []
    for top in folders:
        for path in sorted(glob.glob(os.path.join(top, "**", "args.json"), recursive=True)):
            run_dir = os.path.dirname(path)
            if "died" in os.path.relpath(run_dir, top).split(os.sep):  # a dead attempt set aside by run.py
                continue
            if not glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
                continue
            with open(path) as f:
                args = json.load(f)
            steps, values = load_scalars(run_dir)
            if len(steps):
                runs.append(dict(agent=args.get("exp_name", "?"), env_id=args.get("env_id", "?"),
                                 seed=args.get("seed"), setting=args.get("background", "states"),
                                 steps=steps, values=values, dir=run_dir))
    return runs


def group(runs):
    """{(agent, env_id): [runs]} in a stable order."""
    out = {}
    for r in runs:
        out.setdefault((r["agent"], r["env_id"]), []).append(r)
    return dict(sorted(out.items()))


def curve(runs, band):
    """Common steps and (mean, low, high) over seeds on them."""
    steps = runs[0]["steps"]
    steps = steps[steps <= min(r["steps"][-1] for r in runs)]
    ys = np.stack([np.interp(steps, r["steps"], r["values"]) for r in runs])
    mean = ys.mean(0)
    if band == "std":
        return steps, mean, mean - ys.std(0), mean + ys.std(0)
    return steps, mean, ys.min(0), ys.max(0)


def final_table(groups):
    """Rows (agent, env_id, setting, mean, std, seeds, frames): each seed's evaluation at `frames`, the last frame
    every seed of the group reached (a seed still running does not mix its early return with another's final one;
    a seed without an evaluation there is interpolated between its neighbours, as in `curve`)."""
    rows = []
    for (agent, env_id), runs in groups.items():
        frames = min(r["steps"][-1] for r in runs)
        last = np.array([np.interp(frames, r["steps"], r["values"]) for r in runs])
        rows.append(dict(agent=agent, env_id=env_id, setting=runs[0]["setting"], mean=float(last.mean()),
                         std=float(last.std()), seeds=len(runs), frames=int(frames)))
    return rows


def markdown(rows):
    lines = ["| agent | env id | background | final eval return (mean +- std) | seeds | frames |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['agent']} | {r['env_id']} | {r['setting']} | {r['mean']:.1f} +- {r['std']:.1f} | {r['seeds']} | "
              f"{r['frames']} |" for r in rows]
    return "\n".join(lines) + "\n"


def paper_results(path=os.path.join(HERE, "paper_results.csv")):
    with open(path) as f:
        return list(csv.DictReader(f))


ALIASES = {"ball_in_cup-catch": "cup-catch"}


def is_curve(row):
    return row["table"].startswith("official curve")


def lookup(papers, agent, env_id, setting):
    """The paper's row for this agent/env (the 'plain' or 'natural' column by background), or None."""
    env = ALIASES.get(env_id, env_id)
    for r in papers:
        if r["agent"] == agent and ALIASES.get(r["env_id"], r["env_id"]) == env and not is_curve(r) and (
                r["setting"] == setting or agent == "alm"):
            return r
    return None


def reference_curves(papers, env_id, setting):
    """{(agent, "N seeds"): (frames, mean, min, max)} of the published curves for this env and background."""
    env, out = ALIASES.get(env_id, env_id), {}
    for r in papers:
        if is_curve(r) and ALIASES.get(r["env_id"], r["env_id"]) == env and r["setting"] == setting:
            out.setdefault((r["agent"], r["table"][len("official curve"):].strip(" ()")), []).append([float(r[k]) for k in ("frames", "mean", "min", "max")])
    return {k: tuple(np.array(sorted(v)).T) for k, v in out.items()}


def plot(groups, path, band, papers):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = sorted({env for _, env in groups})
    fig, axes = plt.subplots(1, len(envs), figsize=(4.5 * len(envs), 3.4), squeeze=False)
    for ax, env in zip(axes[0], envs):
        setting = "plain"
        right = max(r["steps"][-1] for (_, e), runs in groups.items() if e == env for r in runs)  # panel's right edge
        for (agent, e), runs in groups.items():
            if e != env:
                continue
            steps, mean, lo, hi = curve(runs, band)
            line, = ax.plot(steps, mean, marker="o", ms=3, label=f"{agent} ({len(runs)} seed{'s' * (len(runs) > 1)})")
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
            setting = runs[0]["setting"]
            paper = lookup(papers, agent, env, setting)
            if paper is not None:
                frames = float(paper["frames"] or right)
                x = frames if frames <= right else right
                ax.plot([x], [float(paper["mean"])], "*", ms=11, color=line.get_color(),
                        label=f"{agent}, {paper['paper'].split(' (')[0]} {paper['table']} at {frames:.0e} frames")
        for (agent, source), (frames, mean, low, high) in reference_curves(papers, env, setting).items():
            keep = frames <= right
            if keep.sum() < 2:  # (Dreamer v1's curve: evaluated every 100k frames, no line within a 30k panel)
                continue
            ax.plot(frames[keep], mean[keep], ":", color="black", label=f"official {agent} code ({source}, min-max)")
            ax.fill_between(frames[keep], low[keep], high[keep], facecolor="none", edgecolor="black", hatch="///",
                            alpha=0.3, lw=0)
        rand = lookup(papers, "random", env, "natural")
        if rand is not None:
            ax.axhline(float(rand["mean"]), ls="--", color="grey", label="random policy (MuDreamer Table 2)")
        ax.set_title(env)
        ax.set_xlabel("frames")
        ax.set_ylabel("eval return")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="folders searched (recursively) for run folders")
    p.add_argument("--out", default="results.png", help="PNG to write")
    p.add_argument("--table", default=None, help="markdown table to write (printed either way)")
    p.add_argument("--band", choices=("std", "minmax"), default="std")
    a = p.parse_args(argv)
    missing = [f for f in a.folders if not os.path.isdir(f)]
    if missing:
        p.error(f"no such folder: {', '.join(missing)}")
    groups = group(find_runs(a.folders))
    if not groups:
        p.error(f"no run with '{TAG}' events under {', '.join(a.folders)}")
    plot(groups, a.out, a.band, paper_results())
    table = markdown(final_table(groups))
    if a.table:
        with open(a.table, "w") as f:
            f.write(table)
    print(table, end="")
    print(f"wrote {a.out}" + (f" and {a.table}" if a.table else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
