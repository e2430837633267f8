"""Where dreamerv3.py's actor gradient comes from: per-path magnitudes on real replay, as training proceeds.

    OMP_NUM_THREADS=1 python benchmarks/actor_gradients.py --env-id cartpole-balance --frames 6000 --updates 300
    OMP_NUM_THREADS=1 python benchmarks/actor_gradients.py ... --lr-scale 4      # every learning rate x4

Collects `--frames` of random-policy replay (one env), then runs dreamerv3.py's own `update` on it
(offline: the replay does not grow) at a tiny configuration (the issue-16 one: deter/units 128, 16x16
latents, cnn depth 8, B x T = 16 x 32). Every `--probe-every` updates it measures, on a fresh batch and
without changing anything:

* the spread of the imagined rewards over all H x N imagined states (std) against the replay's reward std;
* d(sum of normalised advantages)/d(a_t) per imagined action (mean |.|), through both paths of the
  lambda-return and through each alone: `reward` (the critic's values held fixed) and `value` (the
  imagined rewards held fixed);
* the actor's gradient norm from the return term and from the entropy term (3e-4 H[pi]) separately,
  and the mean sqrt(v) of the actor's Adam state against its eps (1e-5).

It prints one JSON line per probe. Not imported by any agent.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dreamerv3 as d  # noqa: E402
from common.envs import make_vector_env  # noqa: E402
from common.replay import ReplayBuffer  # noqa: E402


def collect(env_id, frames, seed):
    envs = make_vector_env(env_id, 1, seed, split="train", action_repeat=2, time_limit=1000)
    obs, _ = envs.reset(seed=seed)
    adim = int(np.prod(envs.single_action_space.shape))
    replay = ReplayBuffer(frames, 1, obs.shape[1:], adim, seed=seed)
    reward, is_first, is_terminal, done = np.zeros(1, np.float32), np.ones(1, bool), np.zeros(1, bool), np.zeros(1, bool)
    rng = np.random.default_rng(seed)
    for _ in range(frames // 2):
        action = rng.uniform(-1, 1, (1, adim)).astype(np.float32)
        replay.add(obs, action, reward, is_first, is_terminal)
        obs, reward, term, trunc, _ = envs.step(action)
        is_first, is_terminal, done = done, term, term | trunc
    envs.close()
    return replay, adim


def probe(wm, actor, critic, return_norm, data, args):
    """Per-path gradient magnitudes on one batch; changes no parameter or statistic."""
    with torch.no_grad():
        deter, stoch, _, _ = wm.rssm.observe(wm.encoder(data["obs"]), data["action"], data["is_first"])
    deter, stoch = deter.flatten(0, 1), stoch.flatten(0, 1)
    wm.requires_grad_(False), critic.requires_grad_(False)
    out = {}
    for path in ("both", "reward", "value"):
        torch.manual_seed(0)  # the same imagined samples for every path
        dd, ss, feats, acts, ents = deter, stoch, [d.feature(deter, stoch)], [], []
        for _ in range(args.imag_horizon):
            a, _, ent = actor(feats[-1].detach())
            acts.append(a), ents.append(ent)
            dd, ss = wm.rssm.img_step(dd, ss, a)
            feats.append(d.feature(dd, ss))
        feat = torch.stack(feats)
        reward = d.twohot_mean(wm.heads["reward"](feat[1:]), wm.bins)
        cont = (wm.heads["cont"](feat[1:])[..., 0] > 0).float()
        weight = torch.cumprod(args.gamma * torch.cat([torch.ones_like(cont[:1]), cont]), 0) / args.gamma
        value = d.twohot_mean(critic(feat), critic.bins)
        ret = d.lambda_return(reward if path != "value" else reward.detach(),
                              value if path != "reward" else value.detach(), cont, args.gamma, args.lam)
        scale = torch.clamp(return_norm.high - return_norm.low, min=args.return_norm_limit)
        adv = (ret - value[:-1]) / scale
        objective = (adv * weight[:-1]).mean()  # minus the actor's return term
        g = torch.stack(torch.autograd.grad(objective, acts, retain_graph=True)) * adv.numel()
        pg = torch.autograd.grad(objective, list(actor.parameters()), retain_graph=True, allow_unused=True)
        out[f"dadv_da_{path}"] = g.abs().mean().item()
        out[f"actor_grad_{path}"] = torch.sqrt(sum((x ** 2).sum() for x in pg if x is not None)).item()
        if path == "both":
            eg = torch.autograd.grad((args.actor_entropy * torch.stack(ents) * weight[:-1]).mean(),
                                     list(actor.parameters()))
            out["actor_grad_entropy"] = torch.sqrt(sum((x ** 2).sum() for x in eg)).item()
            out.update(imag_reward_mean=reward.mean().item(), imag_reward_std=reward.std().item(),
                       value_mean=value.mean().item(), return_scale=scale.item())
    wm.requires_grad_(True), critic.requires_grad_(True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env-id", default="cartpole-balance")
    p.add_argument("--frames", type=int, default=6000)
    p.add_argument("--updates", type=int, default=300)
    p.add_argument("--probe-every", type=int, default=100)
    p.add_argument("--lr-scale", type=float, default=1.0, help="multiply every learning rate")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    args = d.Args(deter=128, units=128, stoch=16, classes=16, cnn_depth=8, batch_size=16, batch_length=32)
    torch.manual_seed(a.seed)
    replay, adim = collect(a.env_id, a.frames, a.seed)
    print(json.dumps({"replay_reward_mean": float(replay.reward[:, :replay.count].mean()),
                      "replay_reward_std": float(replay.reward[:, :replay.count].std())}), flush=True)
    wm = d.WorldModel((3, 64, 64), adim, args.deter, args.stoch, args.classes, args.units, args.mlp_layers,
                      args.cnn_depth, args.unimix, args.reward_bins)
    feat = args.deter + args.stoch * args.classes
    actor = d.Actor(feat, adim, args.units, args.mlp_layers, False, args.actor_min_std, args.actor_max_std, args.unimix)
    critic = d.Critic(feat, args.units, args.mlp_layers, args.reward_bins)
    slow = d.Critic(feat, args.units, args.mlp_layers, args.reward_bins)
    slow.load_state_dict(critic.state_dict()), slow.requires_grad_(False)
    rn = d.ReturnNorm(args.return_norm_decay, args.return_norm_low, args.return_norm_high, args.return_norm_limit)
    opts = (torch.optim.Adam(wm.parameters(), lr=args.model_lr * a.lr_scale, eps=args.model_eps),
            torch.optim.Adam(actor.parameters(), lr=args.actor_lr * a.lr_scale, eps=args.ac_eps),
            torch.optim.Adam(critic.parameters(), lr=args.critic_lr * a.lr_scale, eps=args.ac_eps))
    t0 = time.time()
    for i in range(a.updates + 1):
        data = {k: torch.as_tensor(v) for k, v in replay.sample(args.batch_size, args.batch_length).items()}
        if i % a.probe_every == 0:
            row = {"update": i, "seconds": round(time.time() - t0), **probe(wm, actor, critic, rn, data, args)}
            state = opts[1].state
            if state:
                row["actor_adam_sqrt_v"] = float(np.mean([state[q]["exp_avg_sq"].sqrt().mean().item()
                                                          for q in actor.parameters()]))
            print(json.dumps({k: (round(v, 7) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        if i < a.updates:
            d.update(wm, actor, critic, slow, rn, opts, data, args)


if __name__ == "__main__":
    main()
