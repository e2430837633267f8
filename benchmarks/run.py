"""Run agents x env ids x seeds as separate processes of the real scripts, here or on a SLURM cluster.

    python benchmarks/run.py --agents dreamerv3 mudreamer --env-ids cartpole-balance --seeds 1 2 3 \
        --out results/cartpole -- --total-timesteps 100000
    python benchmarks/run.py ... --workers 2 --threads 1     # this machine: 2 runs at a time, 1 thread each
    python benchmarks/run.py ... --slurm --partition gpu --time 1440 --gpus 1 --cpus 8 --setup "module load cuda"
    python benchmarks/run.py ... --dry-run                   # print the commands and do nothing

Everything after `--` is passed to every run (the same flags for every agent, so use flags they share).
Each run gets its own folder `OUT/{agent}/{env_id}/seed{seed}/`: the command (`cmd.txt`), its stdout and
stderr (`stdout.log`, `stderr.log`) and the script's own run directory under `runs/` (the script runs
with that folder as its working directory). A run whose stdout already holds the script's final JSON
line is finished and is skipped when the same command is given again. A run that died (killed, preempted,
crashed) is reported with the last lines of its stderr; its logs move to `died/N/` inside its folder, and it
is resumed in place from its last checkpoint (`--resume runs/{run}`: the script restores every flag and
refuses a changed model or schedule flag; `--total-timesteps` may grow), or, when it died before its first
checkpoint, started afresh, its partial run directory moved to `died/N/` too (the plotter skips `died/`).
SLURM: one job array through submitit (imported only with --slurm), one
task per run, each writing to the same folders.
"""

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENTS = ("dreamerv3", "mudreamer", "blast", "cvrl", "alm")
FINAL = '{"final_eval_return"'


def run_dirs(out, agents, env_ids, seeds):
    """(agent, env_id, seed, folder) for every combination, in a fixed order."""
    return [(a, e, s, os.path.join(out, a, e, f"seed{s}")) for a in agents for e in env_ids for s in seeds]


def command(agent, env_id, seed, extra, python=sys.executable):
    return [python, os.path.join(ROOT, f"{agent}.py"), "--env-id", env_id, "--seed", str(seed), *extra]


def final_result(folder):
    """The final JSON line of a finished run, or None."""
    try:
        with open(os.path.join(folder, "stdout.log")) as f:
            lines = [ln for ln in f if ln.startswith(FINAL)]
    except OSError:
        return None
    return json.loads(lines[-1]) if lines else None


def tail(path, n=5):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:]).rstrip()
    except OSError:
        return ""


def status(folder):
    """'done', 'died' (started, no final line) or 'new'."""
    if final_result(folder) is not None:
        return "done"
    return "died" if os.path.exists(os.path.join(folder, "stdout.log")) else "new"


def checkpointed_run(folder):
    """The run directory (relative to `folder`) with the newest checkpoint.pt, or None."""
    found = glob.glob(os.path.join(folder, "runs", "*", "checkpoint.pt"))
    return os.path.relpath(os.path.dirname(max(found, key=os.path.getmtime)), folder) if found else None


def set_aside(folder, resume):
    """Move a dead attempt's logs (and, when it cannot be resumed, its run directories) to folder/died/N/."""
    n = 1
    while os.path.exists(os.path.join(folder, "died", str(n))):
        n += 1
    dest = os.path.join(folder, "died", str(n))
    os.makedirs(dest)
    moved = [p for p in ("stdout.log", "stderr.log", "cmd.txt") if os.path.exists(os.path.join(folder, p))]
    if not resume:
        moved += [os.path.join("runs", r) for r in sorted(os.listdir(os.path.join(folder, "runs")))
                  if os.path.isdir(os.path.join(folder, "runs", r))] if os.path.isdir(os.path.join(folder, "runs")) else []
    for p in moved:
        os.makedirs(os.path.dirname(os.path.join(dest, p)), exist_ok=True)
        os.replace(os.path.join(folder, p), os.path.join(dest, p))
    return dest


def run_one(cmd, folder, threads):
    """Run one script to completion in `folder`; returns its exit code. Used here and by SLURM tasks."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "cmd.txt"), "w") as f:
        f.write(shlex.join(cmd) + "\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(os.path.join(folder, "stdout.log"), "w") as out, open(os.path.join(folder, "stderr.log"), "w") as err:
        return subprocess.run(cmd, cwd=folder, env=env, stdout=out, stderr=err).returncode


def parse(argv):
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    else:
        extra = []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", nargs="+", required=True, choices=AGENTS)
    p.add_argument("--env-ids", nargs="+", required=True)
    p.add_argument("--seeds", nargs="+", type=int, default=[1])
    p.add_argument("--out", default="results", help="folder that holds one subfolder per run")
    p.add_argument("--workers", type=int, default=1, help="runs at a time on this machine")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run (0: leave unset)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--slurm", action="store_true", help="submit one SLURM job array through submitit")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--time", type=int, default=24 * 60, help="SLURM time limit per run, minutes")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per SLURM task")
    p.add_argument("--cpus", type=int, default=4, help="CPUs per SLURM task")
    p.add_argument("--mem-gb", type=int, default=32, help="memory per SLURM task, GB")
    p.add_argument("--setup", default=None, help="shell command run before each SLURM task (e.g. 'module load cuda')")
    a = p.parse_args(argv)
    if a.workers < 1 or a.threads < 0:
        p.error(f"--workers must be >= 1 and --threads >= 0, got --workers {a.workers} --threads {a.threads}")
    missing = [x for x in a.agents if not os.path.exists(os.path.join(ROOT, f"{x}.py"))]
    if missing:
        p.error(f"--agents: no script {', '.join(m + '.py' for m in missing)} in {ROOT}")
    return a, extra


def main(argv=None):
    a, extra = parse(sys.argv[1:] if argv is None else argv)
    todo = []
    for agent, env_id, seed, folder in run_dirs(a.out, a.agents, a.env_ids, a.seeds):
        cmd, st = command(agent, env_id, seed, extra), status(folder)
        if st == "done":
            print(f"done     {folder}  final_eval_return {final_result(folder)['final_eval_return']}")
            continue
        if st == "died":
            resume = checkpointed_run(folder)
            how = f"resuming from its checkpoint in {resume}" if resume else "no checkpoint: restarting"
            print(f"died     {folder}  ({how}); last lines of stderr:\n{tail(os.path.join(folder, 'stderr.log'))}")
            if resume:
                cmd = cmd + ["--resume", resume]
            if not a.dry_run:
                set_aside(folder, resume)
        todo.append((cmd, folder))
        print(f"{'would run' if a.dry_run else 'queued':8s} {folder}: {shlex.join(cmd)}")
    if a.dry_run or not todo:
        return 0
    if a.slurm:
        import submitit  # only needed for SLURM

        ex = submitit.AutoExecutor(folder=os.path.join(a.out, "slurm", "%j"))
        ex.update_parameters(slurm_partition=a.partition, timeout_min=a.time, gpus_per_node=a.gpus,
                             cpus_per_task=a.cpus, mem_gb=a.mem_gb, slurm_array_parallelism=len(todo),
                             **({"setup": [a.setup]} if a.setup else {}))
        jobs = ex.map_array(run_one, [c for c, _ in todo], [f for _, f in todo], [a.threads] * len(todo))
        print(f"submitted job array {jobs[0].job_id.split('_')[0]} with {len(jobs)} tasks")
        return 0
    t0 = time.time()

    def go(item):
        cmd, folder = item
        rc = run_one(cmd, folder, a.threads)
        res = final_result(folder)
        msg = f"final_eval_return {res['final_eval_return']}" if res else f"exit {rc}, no final line:\n" + tail(
            os.path.join(folder, "stderr.log"))
        print(f"finished {folder} after {(time.time() - t0) / 60:.1f} min: {msg}", flush=True)
        return rc == 0 and res is not None

    with ThreadPoolExecutor(a.workers) as pool:
        ok = list(pool.map(go, todo))
    print(f"{sum(ok)}/{len(ok)} runs finished")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
