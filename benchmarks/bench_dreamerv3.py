"""One full dreamerv3.py update (world model + actor-critic) at the paper "S" size on a synthetic batch.

B x T = 16 x 64 images 3x64x64, 6-dim continuous actions (walker), imagination horizon 15 from all
B*T posterior states. Run with `python benchmarks/update_speed.py --agents dreamerv3 --device cpu`.
`setup(device, precision="bf16")` times `--precision bf16`, `compile=True` `--compile`; `size="small"` the learning checks' model (README
Results: deter and units 128, 16x16 latents, cnn depth 8, B x T = 16 x 32).
"""

import torch
from synthetic import pixel_batch

import dreamerv3 as d


PRECISIONS = ("fp32", "bf16")
SMALL = dict(deter=128, units=128, stoch=16, classes=16, cnn_depth=8, batch_size=16, batch_length=32)


def setup(device, precision="fp32", size="S", compile=False):
    # paper defaults: deter 512, 32x32 latents, units 512, cnn depth 32, batch 16 x 64
    args = d.Args(precision=precision, compile=compile, **(SMALL if size == "small" else {}))
    torch.manual_seed(0)
    A, B, T, obs_shape = 6, args.batch_size, args.batch_length, (3, 64, 64)
    wm = d.WorldModel(obs_shape, A, args.deter, args.stoch, args.classes, args.units, args.mlp_layers,
                      args.cnn_depth, args.unimix, args.reward_bins).to(device)
    feat = args.deter + args.stoch * args.classes
    actor = d.Actor(feat, A, args.units, args.mlp_layers, False, args.actor_min_std, args.actor_max_std,
                    args.unimix).to(device)
    critic = d.Critic(feat, args.units, args.mlp_layers, args.reward_bins).to(device)
    slow_critic = d.Critic(feat, args.units, args.mlp_layers, args.reward_bins).to(device)
    slow_critic.load_state_dict(critic.state_dict())
    slow_critic.requires_grad_(False)
    return_norm = d.ReturnNorm(args.return_norm_decay, args.return_norm_low, args.return_norm_high,
                               args.return_norm_limit).to(device)
    opts = (torch.optim.Adam(wm.parameters(), lr=args.model_lr, eps=args.model_eps),
            torch.optim.Adam(actor.parameters(), lr=args.actor_lr, eps=args.ac_eps),
            torch.optim.Adam(critic.parameters(), lr=args.critic_lr, eps=args.ac_eps))
    data = pixel_batch(B, T, obs_shape, A, device)

    def step():
        d.update(wm, actor, critic, slow_critic, return_norm, opts, data, args)

    return step, (f"dreamerv3.py {size} (deter {args.deter}, {args.stoch}x{args.classes}, units {args.units}, cnn "
                  f"{args.cnn_depth}), B x T = {B} x {T}, H = {args.imag_horizon}, A = {A}, {precision}"
                  f"{', compiled' if compile else ''}")
