"""Synthetic replay batches for the update benchmarks (shared by the bench_<agent>.py modules)."""

import torch


def pixel_batch(B, T, obs_shape, A, device):
    """A (B, T) batch shaped like `ReplayBuffer.sample`: uint8 frames, actions in [-1, 1], one episode per row."""
    data = dict(obs=torch.randint(0, 256, (B, T, *obs_shape), dtype=torch.uint8, device=device),
                action=torch.rand(B, T, A, device=device) * 2 - 1, reward=torch.rand(B, T, device=device),
                is_first=torch.zeros(B, T, dtype=torch.bool, device=device),
                is_terminal=torch.zeros(B, T, dtype=torch.bool, device=device))
    data["is_first"][:, 0] = True
    return data
