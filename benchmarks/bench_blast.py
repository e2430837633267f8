"""One full blast.py update (world model + target encoder EMA + decoder + actor-critic) at the paper size.

BLAST A.2 DMC / DreamerV2 dmc_vision: deter 200, hidden 200, 8x64 latents with the 8-step AR prior, cnn depth 48
with BatchNorm, 4x400 heads, B x T = 16 x 50 images 3x64x64, 6-dim continuous actions (walker), imagination
horizon 15 from all B*T target posteriors. `setup(device, ladder="dreamerv2")` times another rung of the ladder.
Run with `python benchmarks/update_speed.py --agents blast dreamerv3 --device cpu`.
"""

import torch
from synthetic import pixel_batch

import blast as b


def setup(device, ladder=None):
    args = b.apply_ladder(b.Args(ladder=ladder))  # paper defaults (full BLAST unless a ladder rung is given)
    torch.manual_seed(0)
    A, B, T, obs_shape = 6, args.batch_size, args.batch_length, (3, 64, 64)
    wm, actor, critic, slow_critic, opts = b.make_agent(args, obs_shape, A, device)
    data = pixel_batch(B, T, obs_shape, A, device)
    counter = iter(range(1, 10**9))  # updates after the first: EMA 0.99, slow critic copied every 100

    def step():
        b.update(wm, actor, critic, slow_critic, opts, data, args, next(counter))

    rung = ladder or "ar (full BLAST)"
    return step, (f"blast.py {rung} (deter 200, 8x64 latents, ar_steps {args.ar_steps}, units 400, cnn 48), "
                  f"B x T = {B} x {T}, H = 15, A = {A}")
