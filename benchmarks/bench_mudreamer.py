"""One full mudreamer.py update (world model + decoder + actor-critic) at the paper size on a synthetic batch.

MuDreamer Table 5 ("DreamerV3 Small": deter 512, 32x32 latents, units 512, cnn depth 32), B x T = 16 x 64
images 3x64x64, 6-dim continuous actions (walker), imagination horizon 15 from all B*T posterior states.
`setup(device, decoder=False)` times the run without the auxiliary decoder (`--no-decoder`); `precision="bf16"`
`--precision bf16`; `size="small"` the learning checks' model; `compile=True` `--compile` (the first step compiles).
Run with `python benchmarks/update_speed.py --agents mudreamer dreamerv3 --device cpu`.
"""

import copy

import torch
from synthetic import pixel_batch

import mudreamer as m


PRECISIONS = ("fp32", "bf16")
SMALL = dict(deter=128, units=128, stoch=16, classes=16, cnn_depth=8, batch_size=16, batch_length=32)


def setup(device, decoder=True, precision="fp32", size="S", compile=False):
    # paper defaults (Table 5), or the learning checks' small model (README Results)
    args = m.Args(decoder=decoder, precision=precision, **(SMALL if size == "small" else {}))
    args.compile = compile
    torch.manual_seed(0)
    A, B, T, obs_shape = 6, args.batch_size, args.batch_length, (3, 64, 64)
    wm = m.WorldModel(obs_shape, A, args.deter, args.stoch, args.classes, args.units, args.mlp_layers,
                      args.cnn_depth, args.unimix, args.reward_bins, False, args.actor_min_std, args.actor_max_std,
                      True, args.bn_momentum, decoder).to(device)
    slow_value = copy.deepcopy(wm.heads["value"]).requires_grad_(False)
    feat = args.deter + args.stoch * args.classes
    actor = m.Actor(feat, A, args.units, args.mlp_layers, False, args.actor_min_std, args.actor_max_std,
                    args.unimix).to(device)
    critic = m.Critic(feat, args.units, args.mlp_layers, args.reward_bins).to(device)
    slow_critic = copy.deepcopy(critic).requires_grad_(False)
    return_norm = m.ReturnNorm(args.return_norm_decay, args.return_norm_low, args.return_norm_high,
                               args.return_norm_limit).to(device)
    opts = (torch.optim.Adam([p for n, p in wm.named_parameters() if not n.startswith("decoder.")],
                             lr=args.model_lr, eps=args.model_eps),
            torch.optim.Adam(actor.parameters(), lr=args.actor_lr, eps=args.ac_eps),
            torch.optim.Adam(critic.parameters(), lr=args.critic_lr, eps=args.ac_eps),
            torch.optim.Adam(wm.decoder.parameters(), lr=args.model_lr, eps=args.model_eps) if decoder else None)
    data = pixel_batch(B, T, obs_shape, A, device)

    def step():
        m.update(wm, actor, critic, slow_critic, slow_value, return_norm, opts, data, args)

    return step, (f"mudreamer.py {size} (deter {args.deter}, {args.stoch}x{args.classes}, units {args.units}, cnn "
                  f"{args.cnn_depth}), B x T = {B} x {T}, H = {args.imag_horizon}, A = {A}, decoder "
                  f"{'on' if decoder else 'off'}, {precision}{', compiled' if compile else ''}")
