"""cvrl.py speed at the paper configuration (CVRL App. B): one update, and one acting step with MPC.

`setup(device)` (used by `python benchmarks/update_speed.py --agents cvrl`): one full update on a synthetic
batch, B x T = 50 x 50 images 3x64x64, 6-dim actions (walker): world model with the 2500 x 2500 InfoNCE, Dreamer
actor and value from all 2500 posterior states (H = 15), SAC on the 2450 real transitions. `precision="bf16"`
times `--precision bf16`, `compile=True` `--compile` (the first call, a warm-up one, compiles); `size="small"`
the learning check's model (README Results: stoch 16, deter, hidden and units 64, cnn depth 8, proj dim 64,
B x T = 16 x 32). `python benchmarks/update_speed.py --agents cvrl --precisions fp32 bf16 --size small` times
them side by side.

`setup_act(device, mpc=True)`: one acting step for one env (the paper's and the code's setting): encoder +
posterior step, then the latent-guided MPC (imagine 15 steps with the actor, V_lambda(s_t), backpropagate to the
actions, one SGD step: --mpc-iterations 1), plus exploration noise. `mpc=False` is the --no-mpc step.
Acting runs once per agent step, so at 5e6 frames (2.5e6 agent steps) every millisecond here is ~42 min.

    OMP_NUM_THREADS=1 python benchmarks/bench_cvrl.py          # update, act with MPC, act without MPC
    OMP_NUM_THREADS=1 python benchmarks/bench_cvrl.py --act    # the acting steps only

Quote the thread settings and the machine load (`uptime`) with every number.
"""

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import cvrl as c  # noqa: E402
from synthetic import pixel_batch  # noqa: E402

A, OBS = 6, (3, 64, 64)
PRECISIONS = ("fp32", "bf16")
SMALL = dict(stoch=16, deter=64, hidden=64, units=64, cnn_depth=8, proj_dim=64, batch_size=16, batch_length=32)


def setup(device, precision="fp32", size="S", compile=False):
    # paper defaults: stoch 30, deter 200, units 400, cnn 32, batch 50 x 50, H 15; or the learning check's model
    args = c.Args(precision=precision, compile=compile, **(SMALL if size == "small" else {}))
    torch.manual_seed(0)
    agent, opts, _ = c.build_agent(args, OBS, A, device)
    data = pixel_batch(args.batch_size, args.batch_length, OBS, A, device)

    def step():
        c.update(agent, opts, data, args)

    return step, (f"cvrl.py update {size} (stoch {args.stoch}, deter {args.deter}, units {args.units}, cnn "
                  f"{args.cnn_depth}), B x T = {args.batch_size} x {args.batch_length}, H = {args.imag_horizon}, "
                  f"A = {A}, InfoNCE + SAC, {precision}{', compiled' if compile else ''}")


def setup_act(device, mpc=True, num_envs=1):
    args = c.Args(mpc=mpc)
    torch.manual_seed(0)
    agent, _, act_cfg = c.build_agent(args, OBS, A, device)
    obs = torch.randint(0, 256, (num_envs, *OBS), dtype=torch.uint8, device=device)
    is_first = torch.zeros(num_envs, dtype=torch.bool, device=device)
    state = [c.initial_state(agent, num_envs, device)]

    def step():
        action, state[0], _ = c.policy(agent, state[0], obs, is_first, True, act_cfg)
        return action

    kind = f"MPC H = {args.imag_horizon}, {args.mpc_iterations} iteration(s)" if mpc else "actor only (--no-mpc)"
    return step, f"cvrl.py acting step, {num_envs} env(s), {kind}"


def main():
    from update_speed import time_step

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--act", action="store_true", help="time only the acting steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    device = torch.device(a.device)
    print(f"# device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} load={os.getloadavg()[0]:.2f}")
    benches = [] if a.act else [(setup, dict(), "update", a.repeats)]
    benches += [(setup_act, dict(mpc=True), "act", 10 * a.repeats), (setup_act, dict(mpc=False), "act", 10 * a.repeats)]
    for fn, kw, unit, repeats in benches:
        step, desc = fn(device, **kw)
        med, times = time_step(step, device, a.warmup, repeats)
        print(f"{med * 1e3:9.2f} ms/{unit} (median of {repeats}, min {min(times) * 1e3:.2f}, "
              f"max {max(times) * 1e3:.2f})  {desc}", flush=True)


if __name__ == "__main__":
    main()
