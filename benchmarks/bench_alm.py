"""ALM update speed: one full update (encoder+model on Eq. 7, reward+classifier, critic, actor on Eq. 8,
soft updates) at the paper configuration (Table 3, App. D: batch 512, K 3, latent 50, hidden 512,
model hidden 1024) on a synthetic batch with HalfCheetah's sizes (17-dim states, 6-dim actions).

    python benchmarks/update_speed.py --agents alm --device cpu
"""

import torch

from alm import Agent, Args, make_optimizers, update

OBS_DIM, ACTION_DIM = 17, 6  # HalfCheetah-v5


def setup(device):
    args = Args()
    torch.manual_seed(0)
    agent = Agent(OBS_DIM, ACTION_DIM, args.latent_dim, args.hidden_dim, args.model_hidden_dim).to(device)
    optims, groups = make_optimizers(agent, args.learning_rate)
    B, K = args.batch_size, args.horizon

    def window(T):
        return dict(obs=torch.randn(B, T, OBS_DIM, device=device),
                    action=torch.rand(B, T, ACTION_DIM, device=device) * 2 - 1,
                    reward=torch.randn(B, T, device=device),
                    is_first=torch.zeros(B, T, dtype=torch.bool, device=device),
                    is_terminal=torch.zeros(B, T, dtype=torch.bool, device=device))

    seq, batch = window(K + 1), window(2)

    def step():
        update(agent, optims, groups, seq, batch, 0.5, args)

    return step, f"batch {B}, K {K}, latent {args.latent_dim}, hidden {args.hidden_dim}/{args.model_hidden_dim}, S {OBS_DIM}, A {ACTION_DIM}"
