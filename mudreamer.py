"""MuDreamer: "MuDreamer: Learning Predictive World Models without Reconstruction", Burchi & Timofte 2024,
arXiv:2405.15083. Built on DreamerV3 (arXiv:2301.04104v1, 2023 code); this file is dreamerv3.py with the
paper's changes (Sec. 4), so that `diff dreamerv3.py mudreamer.py` reads as its method section.

Map of this file (a reader who came for the paper can stop at `# --- Main`):
    Args                                every flag; defaults are the paper's values, each help names its source
    # --- Small math helpers            symlog, two-hot, unimix, KL with free bits, lambda-returns, Eq. 5 targets
    # --- Networks                      encoder with BatchNorm, RSSM, world model with value and action heads, actor
    # --- Losses and the update step    [Eqs. 1-5] world model loss, imagination, actor-critic loss, update()
    # --- Acting, evaluation, pictures  the policy, evaluation episodes, the open-loop video, the collapse monitor
    # --- Main                          run machinery: flag checks, progress line, signals, checkpoints, main()

The world model learns without reconstruction, by predicting rewards, continues, the value (Eq. 5) and the
previous action from x_t and s_{t-1}, with BatchNorm in the representation network and KL scales 0.95 / 0.05
(Eq. 4); an optional decoder learns from sg(s_t) for pictures. Behaviour learning is DreamerV3's (Sec. 4.2).

Paper symbol -> code name
    o_t  obs (uint8 image)            x_t  embed = encoder(o_t)          a_t  action
    h_t  deter (GRU state)            z_t  stoch (32 one-hot latents)    s_t = [h_t, z_t]  feat
    q(z_t | h_t, x_t)  post_logits    p(z_t | h_t)  prior_logits         r_t, c_t  reward, cont
    v(s_t)  critic   v'(s_t)  slow_critic   pi(a_t | s_t)  actor   R^lambda_t  ret   S  scale
    value predictor v_phi(s_t)  heads["value"]   its slow EMA copy v_phi'  slow_value
    action predictor p(a_{t-1} | x_t, s_{t-1})  heads["action"]    decoder p(o_t | sg(s_t))  decoder

Shape letters: B batch, T sequence length, H imagination horizon, N = B*T imagination starts,
D deter, S stoch latents, K classes per latent, F = D + S*K feature size, E embed, A action dim.

Replay alignment (common/replay.py): row t holds o_t, the r_t and is_first_t / is_terminal_t received
on arriving at o_t, and the action a_t chosen at o_t; so RSSM step t consumes action[:, t-1], and at
is_first the state is reset to the learned initial state AND the previous action is zeroed.

Tags: `[MuDreamer Eq. N]` points at arXiv:2405.15083v1 Sec. 4, which restates DreamerV3's equations (the
DreamerV3 paper is not in papers/, so DreamerV3-only items are tagged by topic, e.g. `[DreamerV3 two-hot]`).

Deviations from the paper / the 2023 code (each also tagged `# DEVIATION` where it happens):
 1. float32 by default instead of float16 with loss scaling; `--precision bf16` autocasts the update's matrix
    products and convolutions to bfloat16 (no loss scaling needed; norms, distributions and KL stay float32).
    Neither skips non-finite steps: a non-finite loss stops the run instead.
 2. Every replayed batch starts from the learned initial state; the 2023 code carries the last
    posterior of the previous batch into the next, unrelated one.
 3. Pixel observations only (DMC and MiniGrid ids); the MLP encoder/decoder for vector observations is left out.
 4. Eq. 5 across episode boundaries (the paper does not say): where is_first[t+1] the recursion restarts,
    R_t = v'(s_t); the value loss skips those steps and the last one (as the critic skips its bootstrap state).
 5. BatchNorm statistics are per time step over the B sequences inside the sequential posterior loop (each of
    the T steps updates the running statistics), as a recurrent model must; BatchNorm eps is torch's 1e-5.
 6. Interpretation: Table 5's BatchNorm momentum 0.9 is read as the weight of the old running statistics
    (running = 0.9 running + 0.1 batch, torch momentum 0.1), the convention of its "Slow Value Momentum 0.99"
    (Eq. 5: tau 0.01); torch's own convention (momentum 0.9 = weight of the batch) would be the other reading.

Checkpoints and resume (the pattern of dreamerv3.py): every --checkpoint-every frames (and at the end)
runs/{run}/checkpoint.pt is written atomically with every network and its buffers (the BatchNorm running
statistics of the representation network, the return normaliser's EMAs), the slow value predictor v' and the
slow critic, the decoder when there is one, the four optimisers (the decoder's slot None with --no-decoder),
the loop's counters, the last replayed batch while the next log's collapse monitor still reads it, every random
number generator and the args; the replay lives in memory-mapped files in runs/{run}/replay/. --save-model
writes the same format. --resume RUN_DIR continues such a run in place with that run's flags (a larger
--total-timesteps and the logging, evaluation and tracking flags may change; the rest is refused, naming the
flag). The learner's state comes back exactly (an update on the same batch equals the uninterrupted run's),
the run's trajectory does not: the episodes in progress start afresh (the training envs reset with seed --seed +
frame, the acting state from the learned initial state), so the replay's new rows and the batches drawn from
them differ; a checkpoint on an episode's last frame also skips the reset step that follows it, which yields no
frame but counts toward the train ratio, so the updates fall one policy step earlier; and the evaluation envs
are rebuilt, so they replay their episode seeds from the start. After a kill, TensorBoard drops the points
logged after the checkpoint. --eval-checkpoint PATH evaluates a saved agent and prints one JSON line.

Run:  python mudreamer.py --env-id walker-run
      python mudreamer.py --resume runs/walker-run__mudreamer__1__1700000000 [--total-timesteps 2000000]
      python mudreamer.py --eval-checkpoint runs/walker-run__mudreamer__1__1700000000/checkpoint.pt --eval-episodes 10
"""

import copy
import contextlib
import io
import json
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections import deque
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

from common.envs import encode_video, env_defaults, is_pixel, make_vector_env
from common.replay import ReplayBuffer, check_capacity

LN_EPS = 1e-3  # LayerNorm epsilon of the DreamerV3 2023 code
BINS_LIMIT = 20.0  # two-hot bins span [-20, 20] in symlog space (DreamerV3 2023 code)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """`torch.backends.cudnn.deterministic` (--no-torch-deterministic: cuDNN may pick nondeterministic kernels)"""
    cuda: bool = True
    """use CUDA when available (--no-cuda: the CPU)"""
    precision: str = "fp32"
    """fp32|bf16: bf16 runs the update's matrix products and convolutions under bfloat16 autocast, the rest float32"""
    compile: bool = False
    """torch.compile the update's two loss functions (the first update compiles them: minutes on a CPU)"""
    compile_backend: str = "inductor"
    """inductor|aot_eager: the backend of --compile (aot_eager traces without generating code: quick, for tests)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "mbrl-without-reconstruction"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """if toggled, record one episode at every evaluation: a 256x256 mp4 in videos/ and a GIF in TensorBoard"""
    save_model: bool = False
    """if toggled, save the agent to runs/{run_name}/{exp_name}.pt at the end (--eval-checkpoint reads it)"""
    checkpoint_every: int = 25_000
    """frames between checkpoints in runs/{run_name}/checkpoint.pt (also at the end and on Ctrl-C); 0: none"""
    resume: Optional[str] = None
    """continue the run in this run directory (or its checkpoint.pt); its saved flags are the defaults"""
    eval_checkpoint: Optional[str] = None
    """evaluate the agent in this checkpoint file for --eval-episodes episodes, print the JSON line, and stop"""
    env_id: str = "walker-walk"
    """the environment id (DMC pixel tasks: domain-task; MiniGrid: minigrid-dynamic-obstacles-6x6[-rendering])"""
    total_timesteps: int = 1_000_000
    """environment frames (after action repeat) of the run (MuDreamer Table 1: 1M)"""
    num_envs: int = 4
    """parallel training environments (MuDreamer Table 5, DMC: 4)"""
    eval_every: int = 10_000
    """evaluate every this many frames"""
    eval_episodes: int = 10
    """episodes per evaluation (MuDreamer Sec. 5: 10)"""
    log_every: int = 2_000
    """log metrics every this many frames"""

    # Environment
    action_repeat: Optional[int] = None
    """frames per agent step, rewards summed (None: the env's own; DMC 2 as MuDreamer Sec. 5; MiniGrid 1)"""
    time_limit: Optional[int] = None
    """episode length in frames (None: the env's own; DMC standard 1000, MiniGrid 100 as BLAST)"""
    background: str = "plain"
    """DMC background: "plain" or natural videos (common/envs.py)"""
    background_dir: Optional[str] = None
    """folder of background videos (natural backgrounds only)"""
    background_mask: str = "color"
    """how the background is found: "color" or "segmentation" (natural backgrounds only)"""

    # Replay and training schedule (MuDreamer Table 5, DreamerV3 DMC settings)
    buffer_size: int = 1_000_000
    """replay capacity in steps, FIFO (Table 5: 1e6)"""
    batch_size: int = 16
    """sequences per batch, B (Table 5: 16)"""
    batch_length: int = 64
    """steps per sequence, T (Table 5: 64)"""
    train_ratio: int = 512
    """replayed steps per policy step (Table 5, DMC: 512)"""

    # Model size (DreamerV3 "S", MuDreamer Table 5 "DreamerV3 Small" and Tables 6-10)
    deter: int = 512
    """GRU state size, D (Table 7: 512)"""
    stoch: int = 32
    """number of categorical latents, S (Table 5: 32)"""
    classes: int = 32
    """classes per latent, K (Table 5: 32)"""
    units: int = 512
    """hidden width of the RSSM layers and of every MLP (Tables 7-10: 512)"""
    mlp_layers: int = 2
    """hidden layers of the reward, continue, actor and critic MLPs (DreamerV3 "S": 2)"""
    cnn_depth: int = 32
    """channels of the first conv layer, doubled per stage (Table 6: 32-64-128-256)"""

    # World model (DreamerV3 Sec. 2 and its 2023 code; MuDreamer Table 5)
    unimix: float = 0.01
    """uniform mixture of every categorical (DreamerV3: 1%)"""
    reward_bins: int = 255
    """two-hot bins of reward and critic, over [-20, 20] in symlog space (DreamerV3: 255)"""
    kl_dyn: float = 0.95
    """dynamics loss scale beta_dyn (MuDreamer Eq. 4, Table 5: 0.95; Table 3 ablates other pairs)"""
    kl_rep: float = 0.05
    """representation loss scale beta_rep (MuDreamer Eq. 4, Table 5: 0.05)"""
    pred_scale: float = 1.0
    """prediction loss scale beta_pred of the reward, continue, value and action terms (Table 5: 1.0)"""
    reward_loss_scale: float = 1.0
    """extra factor on the reward loss (A.15: 100 for the 6-task natural-background comparison)"""
    value_ema_decay: float = 0.99
    """decay of the slow value predictor v', 1 - tau, updated every step (Eq. 5: tau 0.01; Table 5: 0.99)"""
    bn_momentum: float = 0.9
    """BatchNorm momentum of the representation network, running = m running + (1 - m) batch (Table 5: 0.9)"""
    decoder: bool = True
    """auxiliary decoder on sg(s_t), pictures only, no effect on training (Eq. 1); on as in the paper's runs (Figs. 2-6)"""
    free_bits: float = 1.0
    """free nats per (b, t) below which the KL terms are clipped (MuDreamer Eq. 4: 1)"""
    model_lr: float = 1e-4
    """world model Adam learning rate (Table 5: 1e-4)"""
    model_eps: float = 1e-8
    """world model Adam epsilon (Table 5: 1e-8)"""
    model_clip: float = 1000.0
    """world model gradient norm clip (Table 5: 1000)"""

    # Actor-critic (DreamerV3 Sec. 3; MuDreamer Table 5)
    imag_horizon: int = 15
    """imagination horizon H (Table 5: 15)"""
    gamma: float = 0.997
    """discount gamma, 1 - 1/333 (Table 5: 0.997)"""
    lam: float = 0.95
    """return lambda (Table 5: 0.95)"""
    critic_ema_decay: float = 0.98
    """decay of the slow critic EMA, updated every step (Table 5: 0.98)"""
    critic_slow_reg: float = 1.0
    """scale of the slow critic regulariser (Table 5: 1.0)"""
    return_norm_decay: float = 0.99
    """EMA decay of the return percentiles (Table 5: 0.99)"""
    return_norm_low: float = 5.0
    """lower return percentile (Table 5: 5th)"""
    return_norm_high: float = 95.0
    """upper return percentile (Table 5: 95th)"""
    return_norm_limit: float = 1.0
    """returns are divided by max(limit, S) (MuDreamer Sec. 4.2: 1)"""
    actor_entropy: float = 3e-4
    """entropy scale eta (Table 5: 3e-4)"""
    actor_min_std: float = 0.1
    """minimum std of the continuous actor (DreamerV3 2023 code: 0.1)"""
    actor_max_std: float = 1.0
    """maximum std of the continuous actor (DreamerV3 2023 code: 1.0)"""
    actor_lr: float = 3e-5
    """actor Adam learning rate (Table 5: 3e-5)"""
    critic_lr: float = 3e-5
    """critic Adam learning rate (Table 5: 3e-5)"""
    ac_eps: float = 1e-5
    """actor and critic Adam epsilon (Table 5: 1e-5)"""
    ac_clip: float = 100.0
    """actor and critic gradient norm clip (Table 5: 100)"""

    # Pictures
    video_every: int = 50_000
    """log an open-loop prediction video every this many frames (0: never)"""
    video_context: int = 5
    """context frames of the open-loop video (MuDreamer Fig. 5: 5)"""

    # Ablations (MuDreamer Table 3; KL pairs via --kl-dyn --kl-rep)
    value_predictor: bool = True
    """the value prediction loss (Eq. 5); --no-value-predictor drops it (Table 3 "No Value Predictor")"""
    action_predictor: bool = True
    """the action prediction loss; --no-action-predictor drops it (Table 3 "No Action Predictor")"""
    batch_norm: bool = True
    """BatchNorm in the representation network; --no-batch-norm: LayerNorm (Table 3 "No Batch Normalization")"""


# --- Small math helpers ----------------------------------------------------------------------
def f32(x):
    """Low-precision activations (--precision bf16) to float32; float32 and float64 pass unchanged."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def symlog(x):
    # [DreamerV3 symlog] symlog(x) = sign(x) ln(|x| + 1)
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x):
    # [DreamerV3 symlog] symexp(x) = sign(x) (exp(|x|) - 1), the inverse of symlog
    return torch.sign(x) * torch.expm1(x.abs())


def twohot(x, bins):
    """[DreamerV3 two-hot] Two-hot encoding of x (...,) over sorted bins (K,): weights on the two nearest bins."""
    x = x.clamp(bins[0], bins[-1])
    above = torch.bucketize(x, bins, right=True).clamp(1, len(bins) - 1)  # first bin > x
    below = above - 1
    w_above = (x - bins[below]) / (bins[above] - bins[below])
    return (F.one_hot(below, len(bins)) * (1 - w_above)[..., None]
            + F.one_hot(above, len(bins)) * w_above[..., None])


def twohot_loss(logits, x, bins):
    """-log p(x) of the symlog two-hot distribution, for targets x in the original space."""
    return -(twohot(symlog(x), bins) * F.log_softmax(f32(logits), -1)).sum(-1)


def twohot_mean(logits, bins):
    """[DreamerV3 two-hot] y = symexp(softmax(logits)^T bins)."""
    return symexp((F.softmax(f32(logits), -1) * bins).sum(-1))


def unimix_logits(logits, unimix):
    """[DreamerV3 unimix] probs = (1 - unimix) softmax(logits) + unimix / K; returns log(probs)."""
    probs = F.softmax(f32(logits), -1)
    return torch.log((1 - unimix) * probs + unimix / logits.shape[-1])


def sample_onehot(logits):
    """[DreamerV3 straight-through] one-hot sample + probs - sg(probs)."""
    probs = F.softmax(logits, -1)
    gumbel = -torch.log(-torch.log(torch.rand_like(probs).clamp_(1e-20, 1.0)))
    sample = torch.zeros_like(probs).scatter_(-1, (logits + gumbel).argmax(-1, keepdim=True), 1.0)
    return sample + probs - probs.detach()


def categorical_kl(logits_p, logits_q):
    """KL[p || q] of S independent categoricals, summed over the S latents: (..., S, K) -> (...)."""
    logp, logq = F.log_softmax(f32(logits_p), -1), F.log_softmax(f32(logits_q), -1)
    return (logp.exp() * (logp - logq)).sum((-2, -1))


def kl_terms(post, prior, free_bits):
    """Dynamics and representation losses, free bits per (b, t) after summing over the S latents."""
    # [MuDreamer Eq. 4] L_dyn = max(1, KL[sg(q) || p])
    dyn = torch.clamp(categorical_kl(post.detach(), prior), min=free_bits)
    # [MuDreamer Eq. 4] L_rep = max(1, KL[q || sg(p)])
    rep = torch.clamp(categorical_kl(post, prior.detach()), min=free_bits)
    return dyn, rep


def lambda_return(reward, value, cont, gamma, lam):
    """[MuDreamer Eq. 7] R_t = r_{t+1} + gamma c_{t+1} ((1 - lam) v_{t+1} + lam R_{t+1}), R_H = v_H.

    reward, cont: (H, N) r_1..r_H and c_1..c_H; value: (H+1, N) v_0..v_H. Returns (H, N) R_0..R_{H-1}.
        state   s_0 --a_0--> s_1 --a_1--> s_2 ... s_H
        target  R_0          R_1               (R_H = v_H)
    """
    disc = gamma * cont
    interm = reward + disc * (1 - lam) * value[1:]
    ret, out = value[-1], []
    for t in reversed(range(reward.shape[0])):
        ret = interm[t] + disc[t] * lam * ret
        out.append(ret)
    return torch.stack(out[::-1])


def value_targets(reward, cont, is_first, slow_value, gamma, lam):
    """[MuDreamer Eq. 5] R_t = r_{t+1} + gamma c_{t+1} ((1 - lam) v'(s_{t+1}) + lam R_{t+1}), R_T = v'(s_T).

    (B, T) replay rows: r_{t+1} = reward[:, t+1], c_{t+1} = cont[:, t+1], v'(s_t) = slow_value[:, t]. Where is_first[:, t+1]
    the recursion restarts, R_t = v'(s_t) (DEVIATION 4). Returns R_0..R_{T-2} (B, T-1) and a mask that is 0 there.
    """
    first = is_first[:, 1:]  # (B, T-1)
    ret, out = slow_value[:, -1], []
    for t in reversed(range(reward.shape[1] - 1)):
        ret = reward[:, t + 1] + gamma * cont[:, t + 1] * ((1 - lam) * slow_value[:, t + 1] + lam * ret)
        ret = torch.where(first[:, t], slow_value[:, t], ret)
        out.append(ret)
    return torch.stack(out[::-1], 1), (~first).to(reward.dtype)


class ReturnNorm(nn.Module):
    """[MuDreamer Sec. 4.2] S = EMA(Per(R, 95) - Per(R, 5), 0.99); returns are divided by max(1, S).

    `low` and `high` are EMAs starting at 0, without debiasing (2023 code). Kept on the device, no syncs.
    """

    def __init__(self, decay, low_pct, high_pct, limit):
        super().__init__()
        self.decay, self.limit = decay, limit
        self.register_buffer("q", torch.tensor([low_pct / 100, high_pct / 100]), persistent=False)
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))

    @torch.no_grad()
    def forward(self, ret):
        """Update the EMAs with a batch of returns; return (offset, scale) for (ret - offset) / scale."""
        low, high = torch.quantile(ret.detach().flatten().float(), self.q)
        self.low.lerp_(low, 1 - self.decay)
        self.high.lerp_(high, 1 - self.decay)
        return self.low.clone(), torch.clamp(self.high - self.low, min=self.limit)


def init_weights(m):
    """Truncated normal (+-2 sigma), variance scaling 1/fan_avg, zero bias (DreamerV3 2023 code)."""
    if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(m.weight)
        std = (2.0 / (fan_in + fan_out)) ** 0.5 / 0.87962566103423978  # std of N(0,1) truncated to +-2
        nn.init.trunc_normal_(m.weight, 0.0, std, -2 * std, 2 * std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# --- Networks --------------------------------------------------------------------------------
class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose statistics are computed in float32 (under --precision bf16 its input is bfloat16)."""

    def forward(self, x):
        return super().forward(f32(x))


class BatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d with float32 batch and running statistics (under --precision bf16 its input is bfloat16)."""

    def forward(self, x):
        return super().forward(f32(x))


class ChannelNorm(LayerNorm):
    """LayerNorm over the channels of each pixel of a (N, C, H, W) map (DreamerV3 CNN norm)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def mlp(inp, units, layers, out):
    """[MuDreamer Table 10] `layers` x (Linear + LayerNorm + SiLU), then a Linear to `out` (no bias before a norm)."""
    mods = []
    for i in range(layers):
        mods += [nn.Linear(inp if i == 0 else units, units, bias=False), LayerNorm(units, eps=LN_EPS), nn.SiLU()]
    return nn.Sequential(*mods, nn.Linear(units if layers else inp, out))


class Encoder(nn.Module):
    """[MuDreamer Table 6] Conv k4 s2 p1 + LN + SiLU, depth doubling, down to 4x4; flatten to E."""

    def __init__(self, channels, depth, size):
        super().__init__()
        layers, c_in, c_out = [], channels, depth
        while size > 4:
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), ChannelNorm(c_out, eps=LN_EPS), nn.SiLU()]
            c_in, c_out, size = c_out, 2 * c_out, size // 2
        self.net, self.out_dim = nn.Sequential(*layers), c_in * size * size

    def forward(self, obs):  # (..., C, H, W) uint8 -> (..., E)
        x = obs.reshape(-1, *obs.shape[-3:]).float() / 255.0 - 0.5
        return self.net(x).reshape(*obs.shape[:-3], -1)


class Decoder(nn.Module):
    """Mirror of the encoder: Linear to 4x4 maps, transposed convs k4 s2 p1 (+ LN + SiLU but the last)."""

    def __init__(self, feat_dim, channels, depth, size):
        super().__init__()
        n = int(np.log2(size // 4))
        self.c0 = depth * 2 ** (n - 1)
        self.inp = nn.Linear(feat_dim, self.c0 * 16)
        layers, c = [], self.c0
        for i in range(n):
            last = i == n - 1
            c_out = channels if last else c // 2
            layers += [nn.ConvTranspose2d(c, c_out, 4, 2, 1, bias=last)]
            layers += [] if last else [ChannelNorm(c_out, eps=LN_EPS), nn.SiLU()]
            c = c_out
        self.net = nn.Sequential(*layers)

    def forward(self, feat):  # (..., F) -> (..., C, H, W) in [0, 1] on average
        x = self.inp(feat.reshape(-1, feat.shape[-1])).reshape(-1, self.c0, 4, 4)
        x = self.net(x) + 0.5
        return x.reshape(*feat.shape[:-1], *x.shape[1:])


class RSSM(nn.Module):
    """[MuDreamer Eq. 1, Tables 7-9] Recurrent state-space model with categorical latents.

    sequence model      h_t = f(h_{t-1}, z_{t-1}, a_{t-1})       (img_in + LayerNorm GRU)
    representation      z_t ~ q(z_t | h_t, x_t)                    (obs_out)
    dynamics predictor  z^_t ~ p(z^_t | h_t)                       (img_out)
    """

    def __init__(self, deter, stoch, classes, units, action_dim, embed_dim, unimix, batch_norm=True, bn_momentum=0.9):
        super().__init__()
        self.deter, self.stoch, self.classes, self.unimix = deter, stoch, classes, unimix
        self.img_in = nn.Sequential(nn.Linear(stoch * classes + action_dim, units, bias=False),
                                    LayerNorm(units, eps=LN_EPS), nn.SiLU())
        # GRU with one fused Linear for the three gates and LayerNorm on them (DreamerV3 2023 code).
        self.gru = nn.Linear(units + deter, 3 * deter, bias=False)
        self.gru_norm = LayerNorm(3 * deter, eps=LN_EPS)
        self.img_out = nn.Sequential(nn.Linear(deter, units, bias=False), LayerNorm(units, eps=LN_EPS), nn.SiLU(),
                                     nn.Linear(units, stoch * classes))
        # [MuDreamer Table 8] Representation: Linear([h_t, x_t]) + BatchNorm + SiLU, then a Linear to the logits.
        # The x_t part of the first Linear is applied to all T steps at once in `observe` (same maths, faster).
        norm = BatchNorm1d(units, momentum=1 - bn_momentum) if batch_norm else LayerNorm(units, eps=LN_EPS)
        # (torch momentum = weight of the new batch = 1 - the paper's 0.9, deviation 6; DEVIATION 5: per step of observe)
        self.obs_in = nn.Linear(deter + embed_dim, units, bias=False)
        self.obs_out = nn.Sequential(norm, nn.SiLU(), nn.Linear(units, stoch * classes))
        self.h0 = nn.Parameter(torch.zeros(deter))  # learned initial state, h_0 = tanh(h0)

    def initial(self, n):
        """Learned initial state: h_0 = tanh(w), z_0 = mode of p(z | h_0). (n, D), (n, S, K)."""
        deter = torch.tanh(self.h0)[None]
        logits = self.prior_logits(deter)
        stoch = F.one_hot(logits.argmax(-1), self.classes).to(deter.dtype)
        return deter.expand(n, -1), stoch.expand(n, -1, -1)

    def recurrent(self, deter, stoch, action):
        """h_t = GRU(h_{t-1}, img_in([z_{t-1}, a_{t-1}])), update gate bias -1."""
        # DreamerV3 2023 code: actions larger than 1 are rescaled to norm 1 before entering the model.
        action = action / torch.clamp(action.abs(), min=1.0).detach()
        x = self.img_in(torch.cat([stoch.flatten(-2), action], -1))
        reset, cand, update = self.gru_norm(self.gru(torch.cat([x, deter], -1))).chunk(3, -1)
        reset, update = torch.sigmoid(reset), torch.sigmoid(update - 1.0)
        cand = torch.tanh(reset * cand)
        return update * cand + (1 - update) * deter

    def prior_logits(self, deter):  # (..., D) -> (..., S, K), with unimix
        return unimix_logits(self.img_out(deter).unflatten(-1, (self.stoch, self.classes)), self.unimix)

    def post_logits(self, deter, embed_proj):  # embed_proj = W_x x_t, precomputed
        h = F.linear(deter, self.obs_in.weight[:, : self.deter]) + embed_proj
        return unimix_logits(self.obs_out(h).unflatten(-1, (self.stoch, self.classes)), self.unimix)

    def embed_proj(self, embed):
        return F.linear(embed, self.obs_in.weight[:, self.deter:])

    def reset(self, deter, stoch, prev_action, is_first, init=None):
        """[replay alignment] where is_first: state <- learned initial state AND previous action <- 0."""
        init_deter, init_stoch = self.initial(len(is_first)) if init is None else init
        f = is_first.to(deter.dtype)[:, None]  # (B, 1)
        deter = f * init_deter + (1 - f) * deter
        stoch = f[..., None] * init_stoch + (1 - f[..., None]) * stoch
        return deter, stoch, (1 - f) * prev_action

    def obs_step(self, deter, stoch, prev_action, embed_proj, is_first, init=None):
        """One posterior step: reset where is_first, h_t = f(h_{t-1}, z_{t-1}, a_{t-1}), z_t ~ q(z_t | h_t, x_t)."""
        deter, stoch, prev_action = self.reset(deter, stoch, prev_action, is_first, init)
        deter = self.recurrent(deter, stoch, prev_action)
        logits = self.post_logits(deter, embed_proj)
        return deter, sample_onehot(logits), logits

    def observe(self, embed, action, is_first):
        """Posterior states of a (B, T) sequence; step t consumes action[:, t-1].

            row     t-1                  t
            data    o_{t-1}, a_{t-1}     o_t, a_t
            RSSM                         h_t = f(h_{t-1}, z_{t-1}, a_{t-1}),  z_t ~ q(z_t | h_t, x_t)
        Returns deter (B, T, D), stoch (B, T, S, K), post and prior logits (B, T, S, K).
        """
        B, T = is_first.shape
        # DEVIATION: every batch starts from the learned initial state (row 0 is treated as is_first);
        # the 2023 code carries the last posterior of the previous batch, which belongs to other sequences.
        init = self.initial(B)
        deter, stoch = init
        first = is_first.clone()
        first[:, 0] = True
        embed_proj = self.embed_proj(embed)  # (B, T, units) for all steps at once
        prev_action = torch.cat([torch.zeros_like(action[:, :1]), action[:, :-1]], 1)  # a_{t-1}
        deters, stochs, logits = [], [], []
        for t in range(T):
            deter, stoch, logit = self.obs_step(deter, stoch, prev_action[:, t], embed_proj[:, t], first[:, t], init)
            deters.append(deter), stochs.append(stoch), logits.append(logit)
        deter = torch.stack(deters, 1)
        # The prior does not feed back into the recurrence, so it runs once for all T steps.
        return deter, torch.stack(stochs, 1), torch.stack(logits, 1), self.prior_logits(deter)

    def img_step(self, deter, stoch, action):
        """One imagined step with the dynamics predictor: h_t = f(...), z^_t ~ p(z^_t | h_t)."""
        deter = self.recurrent(deter, stoch, action)
        return deter, sample_onehot(self.prior_logits(deter))


class WorldModel(nn.Module):
    """[MuDreamer Eq. 1] Encoder, RSSM, the reward, continue, value and action predictors, the optional decoder."""

    def __init__(self, obs_shape, action_dim, deter, stoch, classes, units, mlp_layers, cnn_depth,
                 unimix, reward_bins, discrete, min_std, max_std, batch_norm=True, bn_momentum=0.9, decoder=True):
        super().__init__()
        self.encoder = Encoder(obs_shape[0], cnn_depth, obs_shape[-1])
        self.rssm = RSSM(deter, stoch, classes, units, action_dim, self.encoder.out_dim, unimix, batch_norm, bn_momentum)
        feat_dim = deter + stoch * classes
        # [MuDreamer Table 10] 3-layer MLPs (2 x Linear + LN + SiLU, output Linear); the action predictor
        # has the actor's architecture on [x_t, s_{t-1}] (Normal for continuous, one-hot for discrete actions).
        self.heads = nn.ModuleDict({
            "reward": mlp(feat_dim, units, mlp_layers, reward_bins),
            "cont": mlp(feat_dim, units, mlp_layers, 1),
            "value": mlp(feat_dim, units, mlp_layers, reward_bins),
            "action": Actor(self.encoder.out_dim + feat_dim, action_dim, units, mlp_layers, discrete, min_std,
                            max_std, unimix),
        })
        self.register_buffer("bins", torch.linspace(-BINS_LIMIT, BINS_LIMIT, reward_bins))
        self.apply(init_weights)
        # DreamerV3 2023 code: the reward output layer starts at zero (predicts 0 at init).
        nn.init.zeros_(self.heads["reward"][-1].weight)
        nn.init.zeros_(self.heads["reward"][-1].bias)
        nn.init.zeros_(self.heads["value"][-1].weight)  # the value predictor too, like the critic
        nn.init.zeros_(self.heads["value"][-1].bias)
        # [MuDreamer Sec. 4.1] auxiliary decoder p(o_t | sg(s_t)), trained by its own optimiser; its init draws
        # nothing from the global RNG, so that a run is the same with or without it.
        with torch.random.fork_rng(devices=[]):
            self.decoder = Decoder(feat_dim, obs_shape[0], cnn_depth, obs_shape[-1]).apply(init_weights) if decoder else None


def feature(deter, stoch):
    """s_t = [h_t, flatten(z_t)]: (..., D), (..., S, K) -> (..., F)."""
    return torch.cat([deter, stoch.flatten(-2)], -1)


class Actor(nn.Module):
    """pi(a_t | s_t): Normal(tanh(mu), sigma) for continuous actions, unimix one-hot for discrete ones."""

    def __init__(self, feat_dim, action_dim, units, layers, discrete, min_std, max_std, unimix):
        super().__init__()
        self.discrete, self.min_std, self.max_std, self.unimix = discrete, min_std, max_std, unimix
        self.action_dim = action_dim
        self.net = mlp(feat_dim, units, layers, action_dim if discrete else 2 * action_dim)
        self.apply(init_weights)

    def dist(self, feat):
        """Returns (log-prob function, entropy, sampler drawing an action with gradient); draws nothing itself."""
        out = f32(self.net(feat))
        if self.discrete:
            logits = unimix_logits(out, self.unimix)
            logp = F.log_softmax(logits, -1)
            return lambda a: (a * logp).sum(-1), -(logp.exp() * logp).sum(-1), lambda: sample_onehot(logits)
        mean, std = out.chunk(2, -1)
        std = (self.max_std - self.min_std) * torch.sigmoid(std + 2.0) + self.min_std
        normal = torch.distributions.Normal(torch.tanh(mean), std, validate_args=False)  # checks = host syncs
        dist = torch.distributions.Independent(normal, 1, validate_args=False)
        return dist.log_prob, dist.entropy(), dist.rsample

    def forward(self, feat):
        """Returns (action sample with gradient (straight-through for one-hot), log-prob function, entropy)."""
        logp, entropy, sample = self.dist(feat)
        return sample(), logp, entropy


class Critic(nn.Module):
    """v(s_t) as a symlog two-hot distribution over 255 bins; output layer zero-initialised."""

    def __init__(self, feat_dim, units, layers, bins):
        super().__init__()
        self.net = mlp(feat_dim, units, layers, bins)
        self.register_buffer("bins", torch.linspace(-BINS_LIMIT, BINS_LIMIT, bins))
        self.apply(init_weights)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, feat):  # logits (..., bins)
        return self.net(feat)


# --- Losses and the update step --------------------------------------------------------------
def world_model_loss(wm, slow_value, data, loss_scales, free_bits, gamma, lam):
    """[MuDreamer Eq. 2] L = beta_pred L_pred + beta_dyn L_dyn + beta_rep L_rep over a (B, T) batch, no reconstruction.

    `loss_scales` lists every term; "value" and "action" are computed only when named (Table 3 ablations).
    Returns (loss, metrics, posterior states (deter, stoch)).
    """
    obs, action = data["obs"], data["action"]
    embed = wm.encoder(obs)  # (B, T, E)
    deter, stoch, post, prior = wm.rssm.observe(embed, action, data["is_first"])
    feat = feature(deter, stoch)  # (B, T, F)
    losses = {}
    # [MuDreamer Eq. 3] -ln p(r_t | s_t), symlog two-hot
    losses["reward"] = twohot_loss(wm.heads["reward"](feat), data["reward"], wm.bins)
    # [MuDreamer Eq. 3] -ln p(c_t | s_t), Bernoulli with target c_t = 1 - is_terminal
    cont_logits, cont_target = f32(wm.heads["cont"](feat)[..., 0]), 1.0 - data["is_terminal"].float()
    losses["cont"] = F.binary_cross_entropy_with_logits(cont_logits, cont_target, reduction="none")
    if "value" in loss_scales:
        # [MuDreamer Eq. 3, target Eq. 5] -ln p(sg(R_t) | s_t), symlog two-hot, toward lambda-returns of the real
        # rewards and continues bootstrapped by the slow value predictor v'; the gradient shapes the representation.
        # Masked steps count as zeros in the mean below, so a valid step weighs as much as one step of the reward
        # loss (the paper sums per-step NLLs over t); the logged losses/value is diluted by the masked fraction.
        with torch.no_grad():
            slow = twohot_mean(slow_value(feat), wm.bins)  # (B, T) v'(s_t)
            ret, valid = value_targets(data["reward"], cont_target, data["is_first"], slow, gamma, lam)
        losses["value"] = twohot_loss(wm.heads["value"](feat[:, :-1]), ret, wm.bins) * valid  # (B, T-1)
    if "action" in loss_scales:
        # [MuDreamer Eq. 3] action predictor -ln p(a_{t-1} | x_t, s_{t-1}) for t >= 1, not where an episode starts
        # (masked zeros diluted in the mean as for the value). Only the log-prob: no sample is drawn.
        # The target is the executed action: the env clips the policy's Normal sample into [-1, 1], and
        # that clipped action is what caused the change from x_{t-1} to x_t (a no-op for one-hot actions).
        logp, _, _ = wm.heads["action"].dist(torch.cat([embed[:, 1:], feat[:, :-1]], -1))
        losses["action"] = -logp(action[:, :-1].clamp(-1.0, 1.0)) * ~data["is_first"][:, 1:]  # (B, T-1)
    losses["kl_dyn"], losses["kl_rep"] = kl_terms(post, prior, free_bits)
    assert losses.keys() == loss_scales.keys(), (sorted(losses), sorted(loss_scales))
    loss = sum(loss_scales[k] * v.mean() for k, v in losses.items())
    metrics = {f"losses/{k}": v.mean().detach() for k, v in losses.items()}
    metrics["losses/world_model"] = loss.detach()
    metrics["stats/prior_entropy"] = -(prior.exp() * prior).sum((-2, -1)).mean().detach()
    metrics["stats/posterior_entropy"] = -(post.exp() * post).sum((-2, -1)).mean().detach()
    # KL[q || p] before the free-bits clip: the clipped losses read 1.0 for a working and a collapsed model alike
    metrics["stats/kl"] = categorical_kl(post.detach(), prior.detach()).mean()
    return loss, metrics, (deter.detach(), stoch.detach())


def imagine(rssm, actor, deter, stoch, horizon):
    """Roll the dynamics predictor H steps from N start states with actions from pi(a | sg(s)).

    Returns feat (H+1, N, F) for s_0..s_H, and for s_0..s_{H-1} the actions (H, N, A), log-prob
    functions and entropies (H, N). (The action at s_H would enter no loss, so it is not drawn.)
    """
    feats, actions, logps, ents = [feature(deter, stoch)], [], [], []
    for t in range(horizon):
        action, logp, ent = actor(feats[-1].detach())  # the actor sees sg(s_t)
        deter, stoch = rssm.img_step(deter, stoch, action)
        feats.append(feature(deter, stoch)), actions.append(action), logps.append(logp), ents.append(ent)
    return torch.stack(feats), torch.stack(actions), logps, torch.stack(ents)


def actor_critic_loss(wm, actor, critic, slow_critic, return_norm, deter, stoch, is_terminal,
                      horizon, gamma, lam, entropy_scale, slow_reg):
    """[MuDreamer Eqs. 6-9] Actor and critic losses on trajectories imagined from N posterior states.

    deter (N, D), stoch (N, S, K), is_terminal (N,) of the start states. Returns
    (actor_loss, critic_loss, metrics).
    """
    feat, action, logps, ent = imagine(wm.rssm, actor, deter, stoch, horizon)  # (H+1, N, ...)
    reward = twohot_mean(wm.heads["reward"](feat[1:]), wm.bins)  # (H, N) r_1..r_H
    # Continue: real flag for the start state, the continue head's mode afterwards (2023 code).
    cont = (wm.heads["cont"](feat[1:])[..., 0] > 0).float()  # (H, N) c_1..c_H
    cont0 = (1.0 - is_terminal.to(feat.dtype))[None]
    # [DreamerV3 2023 code] weight_t = prod_{i<=t} gamma c_i / gamma: discount for states cut off by an end.
    weight = (torch.cumprod(gamma * torch.cat([cont0, cont]), 0) / gamma).detach()  # (H+1, N)
    # One critic pass serves both losses: the actor's gradient flows through v(s_t) into the dynamics,
    # the critic's loss sees s_t as data (each backward in `update` reaches only its own parameters).
    logits = critic(feat)  # (H+1, N, bins)
    value = twohot_mean(logits, critic.bins)  # (H+1, N), online critic (2023 code)
    ret = lambda_return(reward, value, cont, gamma, lam)  # (H, N)

    # [MuDreamer Sec. 4.2] scale = max(1, EMA(Per(R, 95) - Per(R, 5))); the offset cancels in R - v.
    _, scale = return_norm(ret)
    adv = (ret - value[:-1]) / scale  # (H, N)
    if actor.discrete:
        # [MuDreamer Eq. 9] REINFORCE for discrete actions: -ln pi(a_t | s_t) sg(A_t)
        logpi = torch.stack([logps[t](action[t].detach()) for t in range(horizon)])
        actor_loss = -logpi * adv.detach()
    else:
        # [MuDreamer Eq. 9] continuous actions: backpropagate the return through the dynamics
        actor_loss = -adv
    # [MuDreamer Eq. 9] entropy regulariser -eta H[pi(a_t | s_t)]
    actor_loss = ((actor_loss - entropy_scale * ent) * weight[:-1]).mean()

    # [MuDreamer Eq. 8] critic: -ln p(sg(R_t) | s_t) - ln p(sg(v'(s_t)) | s_t), on sg(s_t)
    slow_value = twohot_mean(slow_critic(feat[:-1].detach()), critic.bins).detach()
    critic_loss = (twohot_loss(logits[:-1], ret.detach(), critic.bins)
                   + slow_reg * twohot_loss(logits[:-1], slow_value, critic.bins))
    critic_loss = (critic_loss * weight[:-1]).mean()
    metrics = {"losses/actor": actor_loss.detach(), "losses/critic": critic_loss.detach(),
               "stats/actor_entropy": ent.mean().detach(), "stats/return_scale": scale,
               "stats/imagined_return": ret.mean().detach(), "stats/imagined_reward": reward.mean().detach()}
    return actor_loss, critic_loss, metrics


COMPILED = {}  # --compile: the loss functions compiled once per process


def loss_fns(compile, backend="inductor"):
    """(world_model_loss, actor_critic_loss), or with --compile their torch.compile'd versions.

    Each loss is compiled whole: its T- or H-step loop is unrolled into one graph (the world model's with the value
    targets' loop, the value and action predictors and the BatchNorm running-statistics updates of every step), and
    AOTAutograd compiles the backward pass with it; shapes are fixed (dynamic=False), so the first call compiles and
    later calls replay. The backward calls, gradient clipping, Adam steps, the slow value predictor's and the slow
    critic's EMAs and the auxiliary decoder (its forward, loss and step: not one of the two losses) stay eager.
    Sampling inside the compiled graphs uses inductor's random numbers (same distributions, other draws than eager
    for one seed). Default mode on every device: CUDA graphs (mode="reduce-overhead") are not used, since no GPU was
    at hand to test them (metrics kept across updates would need copies out of the graphs' memory).
    """
    if not compile:
        return world_model_loss, actor_critic_loss
    if backend not in COMPILED:  # fullgraph: a graph break is an error, not a silent slow path
        COMPILED[backend] = (torch.compile(world_model_loss, dynamic=False, fullgraph=True, backend=backend),
                             torch.compile(actor_critic_loss, dynamic=False, fullgraph=True, backend=backend))
    return COMPILED[backend]


def update(wm, actor, critic, slow_critic, slow_value, return_norm, opts, data, args):
    """One training update: world model, then actor and critic from its posterior states. No host syncs."""
    wm_opt, actor_opt, critic_opt, decoder_opt = opts
    world_model_loss_fn, actor_critic_loss_fn = loss_fns(args.compile, args.compile_backend)
    # DEVIATION: float32 (or --precision bf16 autocast); the 2023 code trains in float16 with loss scaling and
    # skips non-finite steps (here a non-finite loss stops the run at the next log).
    # World model
    loss_scales = {"reward": args.pred_scale * args.reward_loss_scale, "cont": args.pred_scale,
                   "kl_dyn": args.kl_dyn, "kl_rep": args.kl_rep}
    if args.value_predictor:  # ABLATION(value_predictor)
        loss_scales["value"] = args.pred_scale
    if args.action_predictor:  # ABLATION(action_predictor)
        loss_scales["action"] = args.pred_scale
    device_type, low = data["obs"].device.type, args.precision == "bf16"  # --precision bf16: autocast the forward
    with torch.autocast(device_type, torch.bfloat16, enabled=low):
        wm_loss, metrics, (deter, stoch) = world_model_loss_fn(wm, slow_value, data, loss_scales, args.free_bits,
                                                               args.gamma, args.lam)
    wm_opt.zero_grad(set_to_none=True)
    wm_loss.backward()
    metrics["grad_norm/world_model"] = nn.utils.clip_grad_norm_(wm_opt.param_groups[0]["params"], args.model_clip)
    wm_opt.step()
    # [MuDreamer Eq. 5] slow value predictor: v' <- decay v' + (1 - decay) v every update (tau = 1 - decay = 0.01)
    with torch.no_grad():
        for p_slow, p in zip(slow_value.parameters(), wm.heads["value"].parameters()):
            p_slow.lerp_(p, 1.0 - args.value_ema_decay)
    if wm.decoder is not None:
        # [MuDreamer Sec. 4.1] auxiliary decoder -ln p(o_t | sg(s_t)), MSE summed over pixels, own optimiser and clip
        with torch.autocast(device_type, torch.bfloat16, enabled=low):
            recon = f32(wm.decoder(feature(deter, stoch)))  # (B, T, C, H, W) from the detached posterior states
        image_loss = ((recon - data["obs"].float() / 255.0) ** 2).sum((-3, -2, -1)).mean()
        decoder_opt.zero_grad(set_to_none=True)
        image_loss.backward()
        metrics["grad_norm/decoder"] = nn.utils.clip_grad_norm_(wm.decoder.parameters(), args.model_clip)
        decoder_opt.step()
        metrics["losses/image"] = image_loss.detach()

    # Actor-critic in imagination, from all B*T posterior states (the world model is not trained here)
    wm.requires_grad_(False)
    with torch.autocast(device_type, torch.bfloat16, enabled=low):
        actor_loss, critic_loss, ac_metrics = actor_critic_loss_fn(
            wm, actor, critic, slow_critic, return_norm, deter.flatten(0, 1), stoch.flatten(0, 1),
            data["is_terminal"].flatten(), args.imag_horizon, args.gamma, args.lam, args.actor_entropy,
            args.critic_slow_reg)
    wm.requires_grad_(True)
    metrics.update(ac_metrics)
    actor_opt.zero_grad(), critic_opt.zero_grad()
    # Each loss reaches only its own network's parameters (the two share the critic's forward pass).
    actor_loss.backward(inputs=list(actor.parameters()), retain_graph=True)
    critic_loss.backward(inputs=list(critic.parameters()))
    metrics["grad_norm/actor"] = nn.utils.clip_grad_norm_(actor.parameters(), args.ac_clip)
    metrics["grad_norm/critic"] = nn.utils.clip_grad_norm_(critic.parameters(), args.ac_clip)
    actor_opt.step()
    critic_opt.step()
    # Slow critic: EMA of the critic, v' <- decay v' + (1 - decay) v, every update
    with torch.no_grad():
        for p_slow, p in zip(slow_critic.parameters(), critic.parameters()):
            p_slow.lerp_(p, 1.0 - args.critic_ema_decay)
    return metrics


def batch_to(batch, device):
    """A replay batch (numpy arrays) as tensors on `device`; on CUDA through pinned memory with non-blocking copies,
    so the host does not wait for the copy (the update's kernels queue behind it on the same stream)."""
    if device.type != "cuda":
        return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
    return {k: torch.from_numpy(v).pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


# --- Acting, evaluation, pictures ------------------------------------------------------------
@torch.no_grad()
def policy(wm, actor, state, obs, is_first):
    """Filter the new observation into the posterior state and sample a_t ~ pi(a_t | s_t)."""
    deter, stoch, prev_action = state
    embed_proj = wm.rssm.embed_proj(wm.encoder(obs))
    deter, stoch, _ = wm.rssm.obs_step(deter, stoch, prev_action, embed_proj, is_first)
    # The 2023 code samples from the policy both when training and when evaluating.
    action, _, _ = actor(feature(deter, stoch))
    return action, (deter, stoch, action)


@torch.no_grad()
def initial_state(wm, actor, n, device):
    """Acting state (h, z, previous action) of n envs: the learned initial state and a zero action."""
    return (*wm.rssm.initial(n), torch.zeros(n, actor.action_dim, device=device))


def set_mode(training, *modules):
    """Act in eval mode, train in train mode (a no-op with LayerNorm; BatchNorm variants rely on it)."""
    for m in modules:
        m.train(training)


def to_env(action, discrete):
    """Policy output (N, A) -> what the vector env takes (indices for Discrete spaces). A non-finite action (a network
    diverged) stops the run here, as one error line, before the simulator fails on it with a PhysicsError."""
    action = action.cpu().numpy()
    if not np.isfinite(action).all():
        raise FloatingPointError("non-finite action from the policy: a network diverged in an update since the last log")
    return action.argmax(-1) if discrete else action


def evaluate(wm, actor, envs, episodes, device, discrete, capture=False):
    """Mean return of `episodes` episodes on the evaluation envs; with `capture`, env 0's first episode as
    (T, S, W, 3) uint8 video frames (common/envs.py video_frame)."""
    set_mode(False, wm, actor)
    state, (obs, _) = initial_state(wm, actor, envs.num_envs, device), envs.reset()
    is_first, done, returns, frames = np.ones(envs.num_envs, bool), np.zeros(envs.num_envs, bool), [], []
    while len(returns) < episodes:
        if capture and not returns:
            frames.append(envs.call("video_frame")[0])
        action, state = policy(wm, actor, state, torch.as_tensor(obs, device=device),
                               torch.as_tensor(is_first, device=device))
        obs, _, term, trunc, infos = envs.step(to_env(action, discrete))
        is_first, done = done, term | trunc  # NEXT_STEP autoreset: the obs after a done step is the first
        if "episode" in infos:
            returns += [float(r) for r, m in zip(infos["episode"]["r"], infos["_episode"]) if m]
    set_mode(True, wm, actor)
    return returns[:episodes], np.stack(frames) if frames else None


@torch.no_grad()
def openloop_video(wm, actor, data, context, n=4):
    """[MuDreamer Fig. 5] `context` observed frames, then the model imagines the rest with the real actions.

    Returns (T, 3*H, n*W, C) uint8 frames: real on top, model in the middle, error at the bottom.
    """
    set_mode(False, wm, actor)
    obs, action = data["obs"][:n], data["action"][:n]
    embed, first = wm.encoder(obs[:, :context]), data["is_first"][:n, :context]
    deter, stoch, _, _ = wm.rssm.observe(embed, action[:, :context], first)
    d, s, feats = deter[:, -1], stoch[:, -1], [feature(deter, stoch)]
    for t in range(context, obs.shape[1]):
        d, s = wm.rssm.img_step(d, s, action[:, t - 1])  # s_t from s_{t-1} and a_{t-1}
        feats.append(feature(d, s)[:, None])
    model = wm.decoder(torch.cat(feats, 1)).clamp(0, 1)  # (n, T, C, H, W)
    truth = obs.float() / 255.0
    video = torch.cat([truth, model, (model - truth + 1) / 2], 3)  # stack rows along H
    set_mode(True, wm, actor)
    video = torch.cat(list(video), 3)  # (T, C, 3H, nW): sequences side by side
    return (video.permute(0, 2, 3, 1) * 255).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def collapse_monitor(wm, data):
    """[MuDreamer Fig. 13] Per-channel std over the batch of the l2-normalised x_t and h_t, averaged over channels."""
    set_mode(False, wm)
    embed = wm.encoder(data["obs"])  # (B, T, E)
    deter = wm.rssm.observe(embed, data["action"], data["is_first"])[0]  # (B, T, D)
    set_mode(True, wm)
    std = lambda x: F.normalize(x.flatten(0, 1), dim=-1).std(0).mean().item()  # noqa: E731
    return {"mudreamer/embed_std": std(embed), "mudreamer/deter_std": std(deter)}


def log_video(writer, tag, frames, step, fps, path=None):
    """Log (T, H, W, C) uint8 frames as an animated GIF image (TensorBoard's add_video needs moviepy)."""
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    buf = io.BytesIO()
    images = [Image.fromarray(f) for f in frames]
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    h, w, c = frames.shape[1:]
    image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=buf.getvalue())
    writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(buf.getvalue())


# --- Main ---------------------------------------------------------------------------------------
SCRIPT, CHECKPOINT = os.path.basename(__file__), "checkpoint.pt"
# Flags a resumed run may change: they touch neither the model nor the training schedule.
RESUMABLE = ("total_timesteps", "resume", "eval_checkpoint", "save_model", "checkpoint_every", "precision", "compile",
             "compile_backend", "track", "wandb_project_name", "wandb_entity", "cuda", "capture_video", "eval_every",
             "eval_episodes", "log_every", "video_every")
CHECKS = [  # (flag, condition on its value v and the args a, the error after `--flag`), checked in this order
    ("env_id", lambda v, a: is_pixel(v),  # DEVIATION: pixels only; the 2023 code also has MLP encoders for vectors
     "{v}: " + SCRIPT + " learns from pixels; use a DMC id such as walker-walk"),
    *[(f, lambda v, a, low=low: v >= low, f"must be >= {low}, got {{v}}") for f, low in dict(
        seed=0, total_timesteps=1, num_envs=1, eval_episodes=1, eval_every=1, log_every=1,
        batch_length=2, train_ratio=1, deter=1, stoch=1, classes=1, units=1, mlp_layers=0, cnn_depth=1,
        imag_horizon=1, action_repeat=1, reward_bins=2, pred_scale=0, reward_loss_scale=0, kl_dyn=0, kl_rep=0).items()],
    *[(f, lambda v, a: v > 0, "must be > 0, got {v}") for f in (
        "model_lr", "actor_lr", "critic_lr", "model_eps", "ac_eps", "actor_min_std")],
    *[(f, lambda v, a: 0 <= v < 1, "must lie in [0, 1), got {v}") for f in (
        "unimix", "critic_ema_decay", "return_norm_decay", "value_ema_decay", "bn_momentum")],
    ("batch_size", lambda v, a: v >= 2, "must be >= 2 (BatchNorm), got {v}"),
    ("precision", lambda v, a: v in ("fp32", "bf16"), "must be one of fp32, bf16, got {v}"),
    ("compile_backend", lambda v, a: v in ("inductor", "aot_eager"), "must be one of inductor, aot_eager, got {v}"),
    ("video_every", lambda v, a: v >= 0, "must be >= 0 (0: no video), got {v}"),
    ("checkpoint_every", lambda v, a: v >= 0, "must be >= 0 (0: no checkpoints), got {v}"),
    ("resume", lambda v, a: not (v and a.eval_checkpoint), "and --eval-checkpoint exclude each other"),
    ("video_context", lambda v, a: 0 < v < a.batch_length, "must lie in [1, --batch-length {a.batch_length}), got {v}"),
    ("buffer_size", lambda v, a: v >= a.batch_size * a.batch_length,
     "must hold one batch (--batch-size {a.batch_size} x --batch-length {a.batch_length} steps), got {v}"),
    ("gamma", lambda v, a: 0 < v <= 1, "must lie in (0, 1], got {v}"),
    ("lam", lambda v, a: 0 <= v <= 1, "must lie in [0, 1], got {v}"),
    ("return_norm_low", lambda v, a: 0 <= v < 100, "must lie in [0, 100), got {v}"),
    ("return_norm_high", lambda v, a: a.return_norm_low < v <= 100, "must lie in (--return-norm-low, 100], got {v}"),
    ("actor_max_std", lambda v, a: v >= a.actor_min_std, "must be >= --actor-min-std {a.actor_min_std}, got {v}"),
]


def fail(msg):  # bad input: one line `error: ...` on stderr and exit code 2 (a command-line error), no traceback
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def check_args(args):
    """Unset --action-repeat / --time-limit become the env's own (DMC 2 and 1000 frames, MiniGrid 1 and 100), then
    CHECKS in order, before any heavy work: the first bad flag is named with its value."""
    try:
        args = replace(args, **{k: v for k, v in env_defaults(args.env_id).items() if getattr(args, k) is None})
    except ValueError as e:  # an unknown --env-id (with the closest valid ids)
        fail(e)
    for flag, ok, message in CHECKS:
        if not ok(getattr(args, flag), args):
            fail(f"--{flag.replace('_', '-')} " + message.format(v=getattr(args, flag), a=args))
    return args


def fmt_time(s):  # 12 s, 3.4 min, 5.6 h, or ? when unknown
    return "?" if not np.isfinite(s) else f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


class Progress:
    """The status line at each log and, from a heartbeat thread, after 30 s without output; rewritten in place on a
    terminal, plain lines elsewhere (CI, SLURM logs). Rates and ETA: the current phase's, over its last `window_s` s."""

    def __init__(self, total, window_s=120.0, clock=time.monotonic, out=sys.stdout):
        self.total, self.window_s, self.clock, self.out, self.last_print = total, window_s, clock, out, clock()
        self.frames, self.updates, self.recent, self.eval, self.stop = 0, 0, np.nan, np.nan, threading.Event()
        self.lock, self.thread = threading.Lock(), threading.Thread(target=self.beat, daemon=True)
        self.set_phase("setup", 0)

    def set_phase(self, phase, end):  # until frame `end`, its rates measured afresh
        self.phase, self.end, self.samples = phase, end, deque([(self.clock(), self.frames, self.updates)])

    def step(self, frames, updates, recent=None):  # every env step; a rate sample at most once a second
        self.frames, self.updates, self.recent, now = frames, updates, self.recent if recent is None else recent, self.clock()
        if now - self.samples[-1][0] >= 1.0:
            self.samples.append((now, frames, updates))
            while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
                self.samples.popleft()

    def rates(self):  # (frames/s, updates/s) over the phase's recent window
        (t0, f0, u0), dt = self.samples[0], self.clock() - self.samples[0][0]
        return ((self.frames - f0) / dt, (self.updates - u0) / dt) if dt > 0 else (np.nan, np.nan)

    def eta(self):  # seconds until the phase ends
        fps = self.rates()[0]
        return (self.end - self.frames) / fps if fps > 0 else np.nan

    def line(self):
        (fps, ups), eta = self.rates(), fmt_time(self.eta())
        return (f"[{self.phase}] frames {self.frames}/{self.total} | updates {self.updates} ({ups:.2f}/s) | {fps:.1f} "
                f"frames/s | return {self.recent:.1f} | eval {self.eval:.1f} | "
                + (f"prefill ends in {eta}" if self.phase == "prefill" else f"ETA {eta}"))

    def print(self, text=None, live=False):  # `live`: rewritten in place on a terminal
        with self.lock:
            tty = self.out.isatty()
            self.out.write(("\r\033[K" if tty else "") + (text or self.line()) + ("" if live and tty else "\n"))
            self.out.flush()
            self.last_print = self.clock()

    def beat(self):  # the heartbeat thread, from progress.thread.start() to close()
        while not self.stop.wait(1.0):
            if self.clock() - self.last_print >= 30:
                self.print(live=True)

    def close(self):
        self.stop.set()
        if self.thread.ident:
            self.thread.join()
        self.out.write("\n" * self.out.isatty())


SIGNALS = {"deferred": False, "pending": None}  # deferred_signals' state


def on_signal(signum, frame):  # SIGINT / SIGTERM: a KeyboardInterrupt now, or at the end of a deferred section
    if not SIGNALS["deferred"]:
        raise KeyboardInterrupt(signal.Signals(signum).name)
    SIGNALS["pending"] = SIGNALS["pending"] or signal.Signals(signum).name


@contextlib.contextmanager
def deferred_signals():  # a section a signal must not cut in half: an update and its counters, a replay row, a checkpoint
    SIGNALS["deferred"] = True
    try:
        yield
    finally:
        SIGNALS["deferred"] = False
    name, SIGNALS["pending"] = SIGNALS["pending"], None
    if name:
        raise KeyboardInterrupt(name)


def close_envs(*envs, kill=False):
    """Close vector envs quietly; `kill` (after a signal, which can cut a step's messages so that a polite close would
    read a stale reply or wait forever) ends an AsyncVectorEnv's workers instead."""
    for env in envs:
        for p in getattr(env, "processes", []) if kill else []:
            p.kill(), p.join()
            env.closed = True  # nothing left to close, also not at exit
        with warnings.catch_warnings(), contextlib.suppress(BrokenPipeError, ConnectionResetError, EOFError, OSError):
            warnings.simplefilter("ignore")  # gymnasium's warning about a step still pending: it is finished here
            env.close()


def save_checkpoint(path, args, nets, opts, loop, replay=None):
    """Everything needed to continue the run (with the replay's head and sampling RNG, every global RNG), written
    atomically (a temporary file, fsynced, then renamed), never cut by a signal; the replay's files flushed first.
    The state_dicts hold the BatchNorm running statistics; the decoder's optimiser slot is None without a decoder."""
    with deferred_signals():
        if replay is not None:
            replay.flush()
        kind, key, *rest = np.random.get_state()
        rng = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(key.astype(np.int64)), *rest),
               "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        with open(path + ".tmp", "wb") as f:
            torch.save({"script": SCRIPT, "args": asdict(args), "loop": loop, "rng": rng,
                        "nets": {k: m.state_dict() for k, m in nets.items()}, "opts": [o and o.state_dict() for o in opts],
                        "replay": replay.state_dict() if replay is not None else None}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(fd)  # the rename itself survives a power cut
        os.close(fd)


def run_folder(path):  # --resume takes the run's folder or its checkpoint.pt
    return os.path.dirname(path) or "." if os.path.basename(path) == CHECKPOINT and os.path.isfile(path) else path


def load_checkpoint(path, flag, args=None):
    """The checkpoint at `path`, or one error naming `flag` and the file; with `args`, one error for a flag that would
    change the saved run's model or schedule (all but RESUMABLE; an evaluation may pick its --seed, --num-envs)."""
    if not os.path.isfile(path):
        fail(f"{flag}: no checkpoint {path}" + " (was the run started with --checkpoint-every 0?)" * (flag == "--resume"))
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated (EOFError, RuntimeError), or not a checkpoint at all (UnpicklingError)
        fail(f"{flag}: {path} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not isinstance(ck, dict) or ck.get("script") != SCRIPT:
        fail(f"{flag}: {path} is a checkpoint of {ck.get('script') if isinstance(ck, dict) else 'nothing known'}, "
             f"not of {SCRIPT}")
    saved, step, free = ck["args"], ck["loop"]["global_step"], RESUMABLE + ("seed", "num_envs") * (flag != "--resume")
    for name, value in asdict(args).items() if args else ():
        if name not in free and name in saved and saved[name] != value:
            fail(f"--{name.replace('_', '-')} {value} differs from the checkpoint's {saved[name]} ({flag}); "
                 f"a saved run keeps its model, environment and schedule")
    if args and flag == "--resume" and args.total_timesteps <= step < saved["total_timesteps"]:
        fail(f"--total-timesteps {args.total_timesteps}: the run is already at frame {step}; pass a larger "
             f"--total-timesteps to continue it")
    return ck


def restore_checkpoint(ck, nets, opts, replay=None):
    """Networks, optimisers, the replay's head and sampling RNG, then every global RNG (last: nothing drawn while
    restoring shifts them). Returns the saved loop counters."""
    for k, m in nets.items():
        m.load_state_dict(ck["nets"][k])
    for o, state in zip(opts, ck["opts"], strict=True):
        if o is not None:  # (no decoder: None in both; --decoder itself cannot change on resume)
            o.load_state_dict(state)
    if replay is not None:
        replay.load_state_dict(ck["replay"])
    rng, (kind, key, *rest) = ck["rng"], ck["rng"]["numpy"]
    random.setstate(rng["python"])
    np.random.set_state((kind, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return ck["loop"]


def saved_defaults(argv):
    """With --resume RUN or --eval-checkpoint PATH, the saved run's flags as the command line's defaults (None without
    them or when the file cannot be read: main then says why)."""
    for i, a in enumerate(argv):
        for flag in ("--resume", "--eval-checkpoint"):
            if a == flag and i + 1 < len(argv) or a.startswith(flag + "="):
                path = argv[i + 1] if a == flag else a.split("=", 1)[1]
                path = os.path.join(run_folder(path), CHECKPOINT) if flag == "--resume" else path
                with contextlib.suppress(Exception):  # (another script's: main's load_checkpoint says so)
                    saved = torch.load(path, map_location="cpu", weights_only=True)
                    return Args(**{k: v for k, v in saved["args"].items() if k in Args.__dataclass_fields__
                                   and k not in ("resume", "eval_checkpoint")}) if saved["script"] == SCRIPT else None
    return None


def build_agent(args, obs_shape, action_dim, discrete, device):  # the networks as a dict by name, the optimisers
    # (the networks in `update`'s argument order; the decoder's optimiser is None with --no-decoder)
    wm = WorldModel(obs_shape, action_dim, args.deter, args.stoch, args.classes, args.units, args.mlp_layers,
                    args.cnn_depth, args.unimix, args.reward_bins, discrete, args.actor_min_std, args.actor_max_std,
                    args.batch_norm, args.bn_momentum, args.decoder).to(device)  # ABLATION(batch_norm)
    slow_value = copy.deepcopy(wm.heads["value"]).requires_grad_(False)  # v' of Eq. 5, starts as a copy
    feat_dim = args.deter + args.stoch * args.classes
    actor = Actor(feat_dim, action_dim, args.units, args.mlp_layers, discrete, args.actor_min_std,
                  args.actor_max_std, args.unimix).to(device)
    critic = Critic(feat_dim, args.units, args.mlp_layers, args.reward_bins).to(device)
    slow_critic = Critic(feat_dim, args.units, args.mlp_layers, args.reward_bins).to(device)
    slow_critic.load_state_dict(critic.state_dict())
    slow_critic.requires_grad_(False)
    return_norm = ReturnNorm(args.return_norm_decay, args.return_norm_low, args.return_norm_high,
                             args.return_norm_limit).to(device)
    opts = (torch.optim.Adam([p for n, p in wm.named_parameters() if not n.startswith("decoder.")], lr=args.model_lr,
                             eps=args.model_eps),
            torch.optim.Adam(actor.parameters(), lr=args.actor_lr, eps=args.ac_eps),
            torch.optim.Adam(critic.parameters(), lr=args.critic_lr, eps=args.ac_eps),
            torch.optim.Adam(wm.decoder.parameters(), lr=args.model_lr, eps=args.model_eps) if args.decoder else None)
    return {"wm": wm, "actor": actor, "critic": critic, "slow_critic": slow_critic, "slow_value": slow_value,
            "return_norm": return_norm}, opts


def make_envs(args, split):
    """The training or the evaluation envs (seeds from seed + 10,000; env 0 renders 256x256 video frames with
    --capture-video), with (obs shape, action dim, discrete); a bad env flag is one error line."""
    n, seed = (args.num_envs, args.seed) if split == "train" else (min(args.num_envs, args.eval_episodes), args.seed + 10_000)
    try:
        envs = make_vector_env(args.env_id, n, seed, split=split, video_size=256 * (split == "eval" and args.capture_video),
                               action_repeat=args.action_repeat, time_limit=args.time_limit, background=args.background,
                               background_dir=args.background_dir, background_mask=args.background_mask)
    except (ValueError, TypeError) as e:
        fail(e)
    space, discrete = envs.single_action_space, isinstance(envs.single_action_space, gym.spaces.Discrete)
    return envs, (envs.single_observation_space.shape, int(space.n) if discrete else int(np.prod(space.shape)), discrete)


def evaluate_checkpoint(args):
    """--eval-checkpoint: the saved agent on --eval-episodes fresh evaluation episodes; prints the JSON line."""
    path, ck = args.eval_checkpoint, load_checkpoint(args.eval_checkpoint, "--eval-checkpoint", args)
    (envs, (obs_shape, action_dim, discrete)), step = make_envs(args, "eval"), ck["loop"]["global_step"]
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    torch.manual_seed(args.seed)
    nets, _ = build_agent(args, obs_shape, action_dim, discrete, device)
    for k, m in nets.items():
        m.load_state_dict(ck["nets"][k])
    print(f"{SCRIPT}: evaluating {path} (frame {step}) on {args.env_id} for {args.eval_episodes} episodes ...", flush=True)
    try:  # (evaluate acts in eval mode: BatchNorm with the saved running statistics)
        returns, frames = evaluate(nets["wm"], nets["actor"], envs, args.eval_episodes, device, discrete,
                                   args.capture_video)
    finally:
        close_envs(envs)
    out = {"eval_return": float(np.mean(returns)), "eval_returns": returns, "global_step": step, "checkpoint": path}
    if frames is not None:
        out["video"] = os.path.join(os.path.dirname(path), "videos", f"eval_checkpoint_{step}.mp4")
        encode_video(out["video"], frames, fps=30)
    print(json.dumps(out))
    return out


def summary(loop, run_dir):  # the final JSON line, printed; main returns it with the last losses
    out = {"final_eval_return": loop["eval_return"], "eval_returns": loop["returns"], "global_step": loop["global_step"],
           "updates": loop["updates"], "run_dir": run_dir}
    print(json.dumps(out))
    return {**out, "losses": loop["last_metrics"]}


def main(args: Args) -> dict:
    args = check_args(args)
    if args.eval_checkpoint:
        return evaluate_checkpoint(args)
    args = replace(args, resume=args.resume and run_folder(args.resume))
    if args.resume and not os.path.isdir(args.resume):
        fail(f"--resume {args.resume}: no such run directory (give the run's folder, e.g. runs/NAME)")
    ck = load_checkpoint(os.path.join(args.resume, CHECKPOINT), "--resume", args) if args.resume else None
    if ck and args.total_timesteps <= ck["loop"]["global_step"] <= ck["loop"].get("eval_step", -1):  # finished
        return summary(ck["loop"], args.resume)  # its JSON line again (killed before printing it, say); nothing built
    run_dir = args.resume or os.path.join("runs", f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}")
    replay_dir = os.path.join(run_dir, "replay") if args.checkpoint_every or ck else None  # memory-mapped files
    try:  # the replay's size, before anything is built or created (the frames dominate: 3 x 64 x 64 bytes each)
        check_capacity(args.buffer_size, args.num_envs, (3, 64, 64), path=replay_dir, resume=ck is not None)
    except (MemoryError, ValueError) as e:
        fail(e)
    progress = Progress(args.total_timesteps)
    progress.print(f"{SCRIPT}: {args.env_id}, {args.total_timesteps} frames; building {args.num_envs} + "
                   f"{min(args.num_envs, args.eval_episodes)} envs (training + evaluation) ...")
    (envs, (obs_shape, action_dim, discrete)), (eval_envs, _) = make_envs(args, "train"), make_envs(args, "eval")
    try:
        replay = ReplayBuffer(args.buffer_size, args.num_envs, obs_shape, action_dim, seed=args.seed, path=replay_dir,
                              resume=ck is not None)
    except (MemoryError, ValueError) as e:
        close_envs(envs, eval_envs)
        fail(e)
    if args.track:
        import wandb  # only when asked; syncs the TensorBoard scalars, images and text below

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=vars(args),
                   name=os.path.basename(os.path.normpath(run_dir)), save_code=True)
    # on resume TensorBoard drops the points after the checkpoint's frame (those at it came before it was saved)
    writer = SummaryWriter(run_dir, purge_step=ck["loop"]["global_step"] + 1 if ck else None)
    if ck is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(asdict(args), f, indent=1)

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    nets, opts = build_agent(args, obs_shape, action_dim, discrete, device)
    (wm, actor), B, T, N = (nets["wm"], nets["actor"]), args.batch_size, args.batch_length, args.num_envs
    # Every loop counter in one namespace, which a checkpoint saves and restores whole
    loop = SimpleNamespace(global_step=0, updates=0, updates_due=0.0, next_log=args.log_every, next_eval=args.eval_every,
                           next_video=args.video_every, metric_sums={}, n_metrics=0, last_metrics={}, recent_returns=[],
                           eval_return=float("nan"), returns=[], eval_step=-1, data=None)
    # (`data`, the last replayed batch, only while the next log's collapse monitor may still read it: it draws latent
    # samples, so skipping it after a resume would shift every later random draw; 12.6 MB at the defaults)
    if ck:  # networks, optimisers, counters, RNGs, replay head
        vars(loop).update(restore_checkpoint(ck, nets, opts, replay))
        loop.metric_sums = {k: v.to(device) for k, v in loop.metric_sums.items()}
        loop.data = {k: v.to(device) for k, v in loop.data.items()} if loop.data is not None else None
        progress.print(f"resumed {run_dir} at frame {loop.global_step} after {loop.updates} updates (replay "
                       f"{len(replay)} steps); the episodes in progress when it stopped start afresh")
    loop.next_checkpoint = loop.global_step + args.checkpoint_every  # (--checkpoint-every may have changed)

    def evaluation():  # evaluation episodes (the caller advances next_eval: a cut one runs again after --resume)
        phase, progress.phase = progress.phase, "eval"
        loop.returns, frames = evaluate(wm, actor, eval_envs, args.eval_episodes, device, discrete, args.capture_video)
        progress.phase, loop.eval_step, loop.eval_return = phase, loop.global_step, float(np.mean(loop.returns))
        progress.eval = loop.eval_return
        writer.add_scalar("eval/episodic_return", loop.eval_return, loop.global_step)
        if frames is not None:
            encode_video(os.path.join(run_dir, "videos", f"eval_{loop.global_step}.mp4"), frames, fps=30)
            log_video(writer, "eval/video", frames[:, ::4, ::4], loop.global_step, fps=30)

    def checkpoint():  # between env steps, never inside an update; the curves up to it are on disk before it is
        writer.flush()
        save_checkpoint(os.path.join(run_dir, CHECKPOINT), args, nets, opts, vars(loop), replay)

    obs, _ = envs.reset(seed=args.seed + loop.global_step)  # (+ the frame: a resumed run meets new episodes)
    reward, is_first, is_terminal = np.zeros(N, np.float32), np.ones(N, bool), np.zeros(N, bool)
    autoreset, state = np.zeros(N, bool), None  # envs whose next step only resets (no frames); the acting state
    prefill = B * T * args.action_repeat  # frames of random actions until the replay holds one batch
    per_frame = args.train_ratio / (B * T * args.action_repeat)  # updates per frame once training
    start = f"resumed at frame {loop.global_step}" if ck else f"prefilling {prefill} frames with random actions"
    progress.print(f"cost: {B * T} replayed steps per update, {per_frame * args.action_repeat:.3g} updates per policy "
                   f"step, about {int(max(args.total_timesteps - max(prefill, loop.global_step), 0) * per_frame)} "
                   f"updates {'to go' if ck else 'in all'}; {start}, wall time projected after the first updates")
    progress.step(loop.global_step, loop.updates)  # (a resumed run's rates start from here)
    progress.set_phase("prefill", min(prefill, args.total_timesteps))
    progress.thread.start()
    start_time, start_step, start_updates, projected, code = time.time(), loop.global_step, loop.updates, False, None
    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while loop.global_step < args.total_timesteps:
            # ALGO LOGIC: prefill with random actions until the replay holds one batch, then act with the policy
            ready = replay.count >= T and len(replay) >= B * T
            if ready:
                set_mode(False, wm, actor)
                state = initial_state(wm, actor, N, device) if state is None else state
                action, state = policy(wm, actor, state, torch.as_tensor(obs, device=device),
                                       torch.as_tensor(is_first, device=device))
                set_mode(True, wm, actor)
            else:
                action = (F.one_hot(torch.randint(0, action_dim, (N,)), action_dim).float() if discrete
                          else torch.rand(N, action_dim) * 2 - 1)
            with deferred_signals():  # (a row whole)
                replay.add(obs, action.cpu().numpy(), reward, is_first, is_terminal)

            # TRY NOT TO MODIFY: execute the game and log data
            obs, reward, term, trunc, infos = envs.step(to_env(action, discrete))
            with deferred_signals():  # the step's frames and its updates due together
                loop.global_step += args.action_repeat * int((~autoreset).sum())
                # NEXT_STEP autoreset: the step after a done step returns the next episode's first obs
                is_first, is_terminal, autoreset = autoreset, term, term | trunc
                # ALGO LOGIC: training, train_ratio replayed steps per policy step
                loop.updates_due += N * args.train_ratio / (B * T) if ready else 0
            if "episode" in infos:
                for r, l, done in zip(infos["episode"]["r"], infos["episode"]["l"], infos["_episode"]):
                    if done:
                        loop.recent_returns = (loop.recent_returns + [float(r)])[-10:]
                        writer.add_scalar("charts/episodic_return", r, loop.global_step)
                        writer.add_scalar("charts/episodic_length", l, loop.global_step)

            if ready and progress.phase == "prefill":
                progress.set_phase("train", args.total_timesteps)
            while loop.updates_due >= 1:
                compiling = args.compile and loop.updates == start_updates  # (this process's first update)
                if compiling:
                    progress.print("compiling the update (--compile): the first update takes minutes on a CPU")
                    t_compile = time.time()
                with deferred_signals():  # an update and its counters, whole or not at all
                    loop.data = data = batch_to(replay.sample(B, T), device)
                    for k, v in update(*nets.values(), opts, data, args).items():
                        loop.metric_sums[k] = loop.metric_sums.get(k, 0.0) + v
                    loop.n_metrics, loop.updates, loop.updates_due = loop.n_metrics + 1, loop.updates + 1, loop.updates_due - 1
                if compiling:  # rates and the projection count from the compiled update on
                    progress.print(f"compiled the update in {fmt_time(time.time() - t_compile)}")
                    progress.set_phase("train", args.total_timesteps)
                if args.video_every and args.decoder and loop.global_step >= loop.next_video:
                    loop.next_video += args.video_every
                    log_video(writer, "openloop", openloop_video(wm, actor, data, args.video_context), loop.global_step,
                              fps=10)
            progress.step(loop.global_step, loop.updates, np.mean(loop.recent_returns or [np.nan]))
            t0, _, u0 = progress.samples[0]  # (the train phase's start, or its last 2 minutes)
            if progress.phase == "train" and not projected and loop.updates - u0 >= 10 and progress.clock() - t0 >= 20:
                projected = True  # the rest of the run at the train phase's rate
                progress.print(f"measured: {1 / progress.rates()[1]:.2f} s per update with acting; projected wall "
                               f"time of the run{' from here' if ck else ''} "
                               f"{fmt_time(time.time() - start_time + progress.eta())} (evaluations extra)")

            if loop.global_step >= loop.next_log:
                loop.next_log += args.log_every
                if loop.n_metrics:  # the one host-device sync per log
                    means = torch.stack(list(loop.metric_sums.values())).div(loop.n_metrics).tolist()
                    loop.last_metrics, loop.metric_sums, loop.n_metrics = dict(zip(loop.metric_sums, means)), {}, 0
                    for k, v in loop.last_metrics.items():
                        if not np.isfinite(v):
                            raise FloatingPointError(f"non-finite {k} = {v} in the updates logged at frame "
                                                     f"{loop.global_step} (update {loop.updates})")
                        writer.add_scalar(k, v, loop.global_step)
                    for k, v in collapse_monitor(wm, loop.data).items():
                        writer.add_scalar(k, v, loop.global_step)
                    loop.data = None  # (read)
                sps = int((loop.global_step - start_step) / (time.time() - start_time))  # (this process's frames)
                writer.add_scalar("charts/SPS", sps, loop.global_step)
                writer.add_scalar("charts/updates", loop.updates, loop.global_step)
                progress.print(progress.line() + f" | wm loss {loop.last_metrics.get('losses/world_model', np.nan):.2f}")
            if loop.next_eval <= loop.global_step < args.total_timesteps:  # (the final one: after the loop)
                evaluation()
                loop.next_eval += args.eval_every
            if args.checkpoint_every and loop.next_checkpoint <= loop.global_step < args.total_timesteps:
                loop.next_checkpoint += args.checkpoint_every
                checkpoint()
        if loop.eval_step < loop.global_step:  # the final evaluation (done already if a finished run was resumed for it)
            evaluation()
        if args.checkpoint_every:  # the finished run, resumable with a larger --total-timesteps
            checkpoint()
        if args.save_model:  # the same format without the replay's head (--eval-checkpoint reads both)
            save_checkpoint(os.path.join(run_dir, f"{args.exp_name}.pt"), args, nets, opts, vars(loop))
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (on_signal), never inside a deferred_signals() section
        for sig in handlers:
            signal.signal(sig, signal.SIG_IGN)  # a second signal does not cut the checkpoint or the cleanup
        if args.checkpoint_every:  # the state as it is: every section that changes it ran whole
            checkpoint()
        name, where = str(e) or "SIGINT", (f"checkpoint written: --resume {run_dir} continues from frame "
                                           f"{loop.global_step}" if args.checkpoint_every else
                                           "no checkpoint (--checkpoint-every 0)")
        code, message = 130 if name == "SIGINT" else 143, (f"interrupted ({name}) at frame {loop.global_step}/"
                                                           f"{args.total_timesteps} after {loop.updates} updates; {where}")
    except FloatingPointError as e:  # a non-finite loss (at a log step) or action (to_env)
        path = os.path.join(run_dir, CHECKPOINT)
        code, message = 3, f"error: {e}; last checkpoint: {path if os.path.isfile(path) else 'none'}"
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        progress.close()
        close_envs(envs, eval_envs, kill=code in (130, 143))
        writer.close()
        if args.track:
            wandb.finish()
    if code:  # (an interrupt: 128 + the signal's number, as a shell reports it)
        print(message, file=sys.stderr, flush=True)
        raise SystemExit(code)
    return summary(vars(loop), run_dir)


if __name__ == "__main__":
    try:
        main(tyro.cli(Args, default=saved_defaults(sys.argv[1:])))
    except KeyboardInterrupt:  # before the training loop (which handles its own)
        print("interrupted while starting; nothing was trained", file=sys.stderr)
        raise SystemExit(130)
