"""One full blast.py update (world model + target encoder EMA + decoder + actor-critic) at the paper size.

BLAST A.2 DMC / DreamerV2 dmc_vision: deter 200, hidden 200, 8x64 latents with the 8-step AR prior, cnn depth 48
with BatchNorm, 4x400 heads, B x T = 16 x 50 images 3x64x64, 6-dim continuous actions (walker), imagination
horizon 15 from all B*T target posteriors. `setup(device, ladder="dreamerv2")` times another rung of the ladder;
`precision="bf16"` `--precision bf16`; `compile=True` `--compile` (inductor; the first step compiles); `size="small"`
the learning check's model (README Results: deter and hidden 64, 8x16 latents with ar_steps 8, cnn depth 8, units
64, B x T = 8 x 32).
Run with `python benchmarks/update_speed.py --agents blast dreamerv3 --device cpu`.
"""

import torch
from synthetic import pixel_batch

import blast as b


PRECISIONS = ("fp32", "bf16")
SMALL = dict(deter=64, hidden=64, stoch=8, classes=16, ar_steps=8, cnn_depth=8, units=64, batch_size=8,
             batch_length=32)


def setup(device, ladder=None, precision="fp32", size="S", compile=False):
    # paper defaults (full BLAST unless a ladder rung is given), or the learning check's small model
    args = b.apply_ladder(b.Args(ladder=ladder, precision=precision, compile=compile,
                                 **(SMALL if size == "small" else {})))
    torch.manual_seed(0)
    A, B, T, obs_shape = 6, args.batch_size, args.batch_length, (3, 64, 64)
    wm, actor, critic, slow_critic, opts = b.make_agent(args, obs_shape, A, device)
    data = pixel_batch(B, T, obs_shape, A, device)
    counter = iter(range(1, 10**9))  # updates after the first: EMA 0.99, slow critic copied every 100

    def step():
        b.update(wm, actor, critic, slow_critic, opts, data, args, next(counter))

    rung = ladder or "ar (full BLAST)"
    return step, (f"blast.py {size} {rung} (deter {args.deter}, {args.stoch}x{args.classes} latents, ar_steps "
                  f"{args.ar_steps}, units {args.units}, cnn {args.cnn_depth}), B x T = {B} x {T}, "
                  f"H = {args.imag_horizon}, A = {A}, {precision}{', compiled' if compile else ''}")
