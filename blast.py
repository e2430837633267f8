"""BLAST: "Latent Dynamics Models from Bootstrapping", Paster, McKinney, McIlraith, Ba 2021, arXiv:2111.04387
(NeurIPS 2021 Deep RL workshop; code keirp/blast@8d9c3a5, a fork of danijar/dreamerv2).

Map of this file (a reader who came for the paper can stop at `# --- Main`):
    Args                                every flag; defaults are the paper's values, each help names its source
    # --- Small math helpers            KL with balance and free nats, lambda-returns, truncated normal, one-hot
    # --- Networks                      encoder and decoder, RSSM with the AR prior, world model, actor, critic
    # --- Losses and the update step    [BLAST Eq. 2.4] world model loss, imagination, actor-critic loss, update()
    # --- Acting, evaluation, pictures  the policy, evaluation episodes, the open-loop video
    # --- Main                          run machinery: flag checks, progress line, signals, checkpoints, main()

DreamerV2 (discrete RSSM, actor-critic in imagination) with five changes that let the world model learn
without reconstruction (Sec. 3.3): -recon (no pixel loss; a decoder learns on sg(s_t) for pictures only),
+SG (KL balance 1: the posterior gets no gradient from the KL), +EMA (an EMA target encoder gives the KL
targets, Eq. 2.4), +BN (BatchNorm in the encoder and the posterior MLP), +AR (an autoregressive prior over
the latent chunks). The base is DreamerV2's `dmc_vision` config with the DMC column of BLAST A.2.

Paper symbol -> code name
    o_t  obs (uint8 image)   x_t  embed = encoder(o_t)   x^xi_t  target embed = target_encoder(o_t)   a_t  action
    h_t  deter (GRU state)   z_t  stoch (S one-hot latents of K classes)   s_t = [h_t, z_t]  feat
    q_theta(z_t | h_t, x_t)  post logits   q_xi(z_t | h_t, x_t)  target post   p_theta(z_t | h_t)  prior logits
    xi <- tau xi + (1 - tau) theta  ema_update (tau = target_ema)   r^_t  wm.reward (unit Normal)   alpha  kl_balance
    v(s_t)  critic   v_targ(s_t)  slow_critic   pi(a_t | s_t)  actor   V^lambda_t  ret (DreamerV2 lambda-target)

Shape letters: B batch, T sequence length, H imagination horizon, N = B*T imagination starts, D deter,
S stoch latents, K classes, C = S / ar_steps latents per AR chunk, F = D + S*K, E embed, A action dim.

Replay alignment (common/replay.py): row t holds o_t, the r_t and is_first_t received on arriving at o_t, and
the action a_t chosen at o_t; RSSM step t consumes action[:, t-1]; at is_first the state and the previous
action are zeroed (DreamerV2 resets to its zero initial state).
Reward timing (DreamerV2, not DreamerV3): r_t is predicted from s_t and the lambda-return of state t starts
with r_t: V_t = r_t + gamma ((1 - lam) v(s_{t+1}) + lam V_{t+1}); DreamerV3 uses r_{t+1} there instead.

Step counting: BLAST A.2 "steps 1e6" counts DreamerV2 agent steps (one per action, logged x action repeat), so
the paper's 1e6 steps are 2e6 frames of `global_step` (`--total-timesteps 2000000`). `--prefill` and `--train-every`
count agent steps as in A.2 (1000 = 2000 frames; one update per 5 agent steps = a train ratio of B*T/5 = 160).

Ablation ladder of Figs. 3-4 (each rung adds to the one before), one flag each, `--ladder RUNG`:
    dreamerv2  --reconstruction --kl-balance 0.8 --no-target-encoder --no-batch-norm --ar-steps 1
    no_recon   --no-reconstruction (rest as dreamerv2)       sg   + --kl-balance 1.0
    ema        + --target-encoder          bn  + --batch-norm          ar  + --ar-steps S (= full BLAST, default)
A.3 (Fig. 5) "latent prediction only": `--no-reward-grad` (no reward gradient into the representation).

Tags: `[BLAST Eq. 2.N]` / `[BLAST Sec. N]` point at arXiv:2111.04387. DreamerV2 (arXiv:2010.02193, not in papers/)
items are tagged by topic or code name (`[DreamerV2 lambda-target]`); BLAST runs that code where it says nothing.
MiniGrid (Sec. 3.1.1, Fig. 3): `--preset minigrid` is the A.2 Gym-MiniGrid column (with the official minigrid-repeat
config where A.2 is silent) on `--env-id minigrid-dynamic-obstacles-6x6[-color-direction|-smaller-agent|-random-frames|
-video]`; add `--ladder RUNG` for each bar. Discrete actions get DreamerV2's one-hot actor, trained by REINFORCE
(`--actor-grad auto`: reinforce for discrete, dynamics for continuous actions, DreamerV2's rule).
Decisions where paper and issue are silent: evaluation takes the actor's mode and samples the latent (DreamerV2
eval mode); pictures use the acting encoder; the ladder overrides the 5 switches, the preset only defaults.

Checkpoints (`--checkpoint-every` frames, default 25,000, 0 = none; `--resume RUN_DIR` or RUN_DIR/checkpoint.pt;
`--eval-checkpoint PATH`): runs/{run}/checkpoint.pt, written atomically, also on Ctrl-C or SIGTERM (exit 130 / 143;
a signal inside an update with its counters, a replay row or a checkpoint write waits for its end, and an evaluation
it cuts runs again after --resume), holds every network (world model with the EMA target encoder when there is one,
BatchNorm running statistics and the AR prior; actor; critic; slow critic), the four Adams (model, actor, critic,
decoder), every loop counter (frames, updates, which schedule the slow critic's hard copies and the target encoder's
first copy; the train_every credit; whether the pretrain burst ran; next log, evaluation, video and checkpoint
frames; the frame of the last finished evaluation; metric sums; recent returns), the torch, numpy and Python RNGs,
the replay's head and sampling RNG (its rows are memory-mapped files in runs/{run}/replay/) and the args as --preset
and --ladder resolved them (a resumed run takes them as its defaults and applies neither again). Updates after a
resume equal the uninterrupted run's, given the same replay. Not restored, so a resumed run is not the uninterrupted
one bit for bit: the episodes in progress (the training envs are reset with seed + frame, the acting state starts
from zeros), the evaluation envs' RNG (reseeded as at the start), and, after a kill, the replay rows written since
the checkpoint (common/replay.py). A finished run resumed prints its saved summary line. Only --total-timesteps,
--precision, --compile, --compile-backend and the logging, evaluation and tracking flags may change (RESUMABLE).
`--save-model` writes the same format without the replay's head to runs/{run}/{exp_name}.pt.

Deviations from the paper / the official code (each also tagged `# DEVIATION` where it happens):
 1. float32 instead of mixed float16 (--precision bf16: the update's forward under bfloat16 autocast, the norms,
    distributions and losses in float32); a non-finite loss stops the run at the next log (one line, exit 3).
 2. Replayed windows may cross episode starts (state and action zeroed at is_first); DreamerV2's replay samples
    each window inside one episode (minlen = maxlen = length 50). Both start every window from the zero state (there
    its first step is marked is_first, which zeroes the posterior carried over from the previous batch).
 3. The decoder has its own Adam (same settings) and clip; the official code's model optimiser also holds it, so
    its gradient norm shares the world model's clip of 100 and could rescale world-model steps although A.5 calls
    the decoder visualisation only. With --reconstruction the pixel loss also flows into the features.
 4. The AR prior computes only the current chunk's logits at each of its steps (the official head computes all
    S*K logits and keeps one chunk) and skips the AR GRU step after the last chunk: same values. Without the target
    encoder (no ladder rung) it is teacher-forced on sg(online posterior); the official code runs it free there.
 5. Replay capacity 1e6 steps by default (DreamerV2: 2e6), which fits in memory; --buffer-size 2000000 restores it.
 6. Truncated-normal samples by the inverse CDF (torch.special.ndtri), its argument clamped to [1e-6, 1 - 1e-6],
    then DreamerV2's straight-through clip to [-1 + 1e-6, 1 - 1e-6]; TFP samples exactly (implicit gradients).
 7. The slow critic starts as a copy of the critic (official: own init, first copied after update 0). The target
    encoder's first update copies the online one (BYOL; official update_targets: xi <- mix xi + (1 - mix) theta with
    mix 1 at update 0, which keeps xi's own random init). Adam's eps is torch's, not Keras' (before bias correction).
 8. REINFORCE scores sg(a_t) (as DreamerV3); the official log_prob reads the straight-through imagined sample, whose
    gradient adds sg(A_t) sum_k ln pi_k grad pi_k. `--preset minigrid`: A.2's 16 x 64 latents with ar_steps 16 (the
    official sweep grid_exps.yaml ran 8 x 64, ar_steps 8), uniform replay windows (official prioritize_ends True),
    10 evaluation episodes (official eval_eps 5).

Run:  python blast.py --env-id walker-walk            (full BLAST; --ladder dreamerv2 for the base)
      python blast.py --preset minigrid --env-id minigrid-dynamic-obstacles-6x6-video   (Fig. 3, one bar)
      python blast.py --resume runs/RUN   (finish an interrupted run; a larger --total-timesteps grows it)
      python blast.py --eval-checkpoint runs/RUN/checkpoint.pt --eval-episodes 10
"""

import contextlib
import copy
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
from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

from common.envs import encode_video, env_defaults, is_pixel, make_vector_env
from common.replay import ReplayBuffer, check_capacity

LN_EPS = 1e-3  # Keras LayerNormalization epsilon (DreamerV2 GRU)
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # Keras BatchNormalization defaults: eps 1e-3, running = 0.99 running + 0.01 batch
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
LADDER = ("dreamerv2", "no_recon", "sg", "ema", "bn", "ar")
# [BLAST A.2, Gym-MiniGrid column] `--preset minigrid`; where A.2 is silent, the official minigrid-repeat config
# (keirp/blast dreamerv2/configs.yaml). The BLAST rows of A.2 are the defaults already. ar_steps follows stoch.
PRESETS = {"minigrid": dict(
    env_id="minigrid-dynamic-obstacles-6x6",  # [BLAST Sec. 3.1.1] the unmodified rendering
    total_timesteps=50_000, action_repeat=1, time_limit=100,  # A.2 steps 5e4 (repeat 1: frames); Sec. 3.1.1 horizon 100
    eval_every=2_500,  # minigrid-repeat eval_every 2500; DEVIATION: 10 episodes (house rule), official eval_eps 5
    prefill=10_000, train_every=1, pretrain=1,  # A.2 prefill 10,000, train_every 1; DreamerV2 default pretrain 1
    deter=600, hidden=600, stoch=16, classes=64,  # A.2 rssm.deter 600, hidden 600, stoch 16, discrete 64
    # DEVIATION: A.2's 16 x 64 latents (ar_steps 16); the official sweep grid_exps.yaml ran 8 x 64 with ar_steps 8
    kl_scale=0.1, reward_scale=100.0, reward_clamp="tanh",  # A.2 loss_scales.kl 0.1, loss_scales.reward 100, tanh
    kl_free=0.0, gamma=0.99, actor_grad="reinforce",  # DreamerV2 default kl.free 0; A.2 discount 0.99, reinforce
    model_lr=4e-4, actor_lr=8e-5, critic_lr=1e-4, actor_entropy=0.1,  # minigrid-repeat model/actor/critic lr, actor_ent
)}  # DEVIATION: uniform replay windows (minigrid-repeat keeps DreamerV2's replay.prioritize_ends True)


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
    total_timesteps: int = 2_000_000
    """environment frames (after action repeat) of the run (BLAST A.2 DMC: steps 1e6 agent steps = 2e6 frames)"""
    num_envs: int = 1
    """parallel training environments (DreamerV2 default: envs 1)"""
    eval_every: int = 10_000
    """evaluate every this many frames"""
    eval_episodes: int = 10
    """episodes per evaluation (house rule 10; DreamerV2 evaluates 1 episode per 1e4 agent steps)"""
    log_every: int = 2_000
    """log metrics every this many frames"""

    # Environment
    action_repeat: Optional[int] = None
    """frames per agent step, rewards summed (None: the env's own; DMC 2, DreamerV2 dmc_vision; MiniGrid 1)"""
    time_limit: Optional[int] = None
    """episode length in frames (None: the env's own; DMC standard 1000, MiniGrid 100 as BLAST Sec. 3.1.1)"""
    background: str = "plain"
    """DMC background: "plain" or natural videos (common/envs.py)"""
    background_dir: Optional[str] = None
    """folder of background videos (natural backgrounds only)"""
    background_mask: str = "color"
    """how the background is found: "color" or "segmentation" (natural backgrounds only)"""

    # Replay and training schedule (BLAST A.2 DMC, DreamerV2 dmc_vision)
    buffer_size: int = 1_000_000  # DEVIATION: DreamerV2 holds 2e6 steps; 1e6 fits in memory
    """replay capacity in steps, FIFO (DreamerV2 replay.capacity: 2e6; 1e6 here to fit in memory)"""
    batch_size: int = 16
    """sequences per batch, B (DreamerV2 dataset.batch: 16)"""
    batch_length: int = 50
    """steps per sequence, T (DreamerV2 dataset.length: 50)"""
    prefill: int = 1000
    """random-action agent steps before training (BLAST A.2 DMC: prefill 1000)"""
    pretrain: int = 100
    """updates run once when the prefill ends (DreamerV2 dmc_vision: pretrain 100)"""
    train_every: int = 5
    """agent steps per update after the prefill (BLAST A.2 DMC: train_every 5)"""

    # World model (BLAST A.2 DMC, DreamerV2 dmc_vision)
    deter: int = 200
    """GRU state size, D (BLAST A.2 DMC: rssm.deter 200)"""
    hidden: int = 200
    """hidden width of the RSSM layers (BLAST A.2 DMC: rssm.hidden 200)"""
    stoch: int = 8
    """number of categorical latents, S (BLAST A.2 DMC: rssm.stoch 8)"""
    classes: int = 64
    """classes per latent, K (BLAST A.2 DMC: rssm.discrete 64)"""
    cnn_depth: int = 48
    """channels of the first conv, doubled per layer, 4 layers k4 s2 (DreamerV2 encoder.cnn_depth 48)"""
    units: int = 400
    """width of the reward, actor and critic MLPs (DreamerV2 heads: 400)"""
    mlp_layers: int = 4
    """hidden ELU layers of the reward, actor and critic MLPs (DreamerV2 heads: 4)"""
    kl_free: float = 1.0
    """free nats on the batch-mean KL (DreamerV2 dmc_vision: kl.free 1.0, free_avg True)"""
    kl_scale: float = 1.0
    """KL loss scale beta_KL (BLAST A.2 DMC: loss_scales.kl 1.0)"""
    reward_scale: float = 1.0
    """reward loss scale beta_r (BLAST A.2 DMC: loss_scales.reward 1.0)"""
    reward_clamp: str = "identity"
    """identity|tanh of the replayed rewards before the reward loss (BLAST A.2 reward_clamp: DMC none, MiniGrid tanh)"""
    image_scale: float = 1.0
    """image loss scale beta_img of the decoder loss (DreamerV2 loss_scales: image unset, default 1.0)"""
    model_lr: float = 3e-4
    """world model Adam learning rate (DreamerV2 dmc_vision: model_opt.lr 3e-4)"""
    model_eps: float = 1e-5
    """world model Adam epsilon (DreamerV2 model_opt.eps 1e-5)"""
    model_clip: float = 100.0
    """world model gradient norm clip (DreamerV2 model_opt.clip 100)"""
    weight_decay: float = 1e-6
    """decoupled weight decay w <- (1 - wd) w before each Adam step, all optimisers (DreamerV2 opt wd 1e-6)"""
    target_ema: float = 0.99
    """target encoder EMA tau: xi <- tau xi + (1 - tau) theta after every model update (BLAST A.2: target_ema 0.99)"""
    target_input_p: float = 0.5
    """share of the batch whose target posterior feeds the prior and reward head (BLAST A.2: target_input_p 0.5)"""

    # Actor-critic (DreamerV2 dmc_vision; BLAST A.2 DMC)
    imag_horizon: int = 15
    """imagination horizon H (DreamerV2 imag_horizon 15)"""
    gamma: float = 0.99
    """discount gamma (BLAST A.2 DMC: discount 0.99)"""
    lam: float = 0.95
    """lambda-return lambda (DreamerV2 discount_lambda 0.95)"""
    actor_entropy: float = 1e-4
    """actor entropy scale eta (DreamerV2 dmc_vision: actor_ent 1e-4)"""
    actor_grad: str = "auto"
    """actor gradient: dynamics|reinforce|auto = reinforce for discrete actions (DreamerV2; BLAST A.2: DMC dynamics)"""
    actor_min_std: float = 0.1
    """minimum std of the truncated-normal actor (DreamerV2 actor.min_std 0.1)"""
    actor_lr: float = 8e-5
    """actor Adam learning rate (DreamerV2 dmc_vision: actor_opt.lr 8e-5)"""
    critic_lr: float = 8e-5
    """critic Adam learning rate (DreamerV2 dmc_vision: critic_opt.lr 8e-5)"""
    ac_eps: float = 1e-5
    """actor and critic Adam epsilon (DreamerV2 actor_opt/critic_opt eps 1e-5)"""
    ac_clip: float = 100.0
    """actor and critic gradient norm clip (DreamerV2 actor_opt/critic_opt clip 100)"""
    slow_critic_every: int = 100
    """updates between hard copies critic -> slow target critic (DreamerV2 slow_target_update 100, fraction 1)"""

    # Pictures
    video_every: int = 50_000
    """log an open-loop prediction video every this many frames (0: never)"""
    video_context: int = 5
    """context frames of the open-loop video (DreamerV2 video_pred: 5)"""

    # BLAST modifications (Sec. 3.3), defaults = full BLAST; each consumed in one place marked ABLATION
    reconstruction: bool = False
    """the pixel loss trains the representation as in DreamerV2 (--no-reconstruction: BLAST Sec. 3.3 -recon)"""
    kl_balance: float = 1.0
    """+SG: KL balance alpha, 1.0 = no KL gradient into the posterior (BLAST A.2: kl.balance 1.0; DreamerV2: 0.8)"""
    target_encoder: bool = True
    """+EMA: EMA target encoder for the KL targets, imagination starts and acting (BLAST A.2: use_target_encoder true)"""
    batch_norm: bool = True
    """+BN: BatchNorm after each encoder conv and in the posterior MLP (BLAST A.2: encoder.norm bn, rssm.obs_out_norm bn)"""
    ar_steps: int = 8
    """+AR: autoregressive prior steps over the S latents, 1 = DreamerV2's independent prior (BLAST A.2: ar_steps = rssm.stoch)"""
    reward_grad: bool = True
    """reward gradient into the representation; --no-reward-grad = BLAST A.3 latent prediction only (Fig. 5)"""
    ladder: Optional[str] = None
    """rung of the Figs. 3-4 ablation ladder, setting the five switches above: dreamerv2|no_recon|sg|ema|bn|ar"""
    preset: Optional[str] = None
    """minigrid = BLAST A.2's Gym-MiniGrid column (PRESETS), for the values still at their defaults"""


# --- Small math helpers ----------------------------------------------------------------------
def f32(x):
    """Low-precision activations (--precision bf16) to float32; float32 and float64 pass unchanged."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def gaussian_nll(pred, target):
    """[DreamerV2 'mse' dist] -ln N(target; pred, 1) = 0.5 (target - pred)^2 + 0.5 ln 2 pi, elementwise."""
    return 0.5 * (target - f32(pred)) ** 2 + HALF_LOG_2PI


def sample_onehot(logits):
    """[DreamerV2 OneHotDist] one-hot sample with straight-through gradients: sample + probs - sg(probs)."""
    logits = f32(logits)
    probs = F.softmax(logits, -1)
    gumbel = -torch.log(-torch.log(torch.rand_like(probs).clamp_(1e-20, 1.0)))  # Gumbel-max: no host sync
    sample = torch.zeros_like(probs).scatter_(-1, (logits + gumbel).argmax(-1, keepdim=True), 1.0)
    return sample + probs - probs.detach()


def categorical_entropy(logits):  # (..., S, K) -> mean over (...) of the entropy summed over the S latents
    logits = f32(logits)
    return -(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum((-2, -1)).mean().detach()


def categorical_kl(logits_p, logits_q):
    """KL[p || q] of S independent categoricals, summed over the S latents: (..., S, K) -> (...)."""
    logp, logq = F.log_softmax(f32(logits_p), -1), F.log_softmax(f32(logits_q), -1)
    return (logp.exp() * (logp - logq)).sum((-2, -1))


def kl_loss(post, prior, balance, free):
    """[DreamerV2 KL balancing, BLAST Eq. 2.4] alpha max(free, E KL[sg(q) || p]) + (1 - alpha) max(free, E KL[q || sg(p)]).
    post, prior: logits (B, T, S, K); free nats on the batch mean (free_avg); alpha = 1 (+SG) trains only p.
    Returns (loss, mean KL)."""
    prior_term = torch.clamp(categorical_kl(post.detach(), prior).mean(), min=free)  # trains p
    post_term = torch.clamp(categorical_kl(post, prior.detach()).mean(), min=free)  # trains q
    return balance * prior_term + (1 - balance) * post_term, categorical_kl(post, prior).mean().detach()


def lambda_return(reward, value, disc, bootstrap, lam):
    """[DreamerV2 lambda-target, common.lambda_return] V_t = r_t + d_t ((1 - lam) v_{t+1} + lam V_{t+1}), V_H = bootstrap.
    reward, value, disc: (H, N) r_0..r_{H-1}, v_0..v_{H-1}, d_0..d_{H-1}; bootstrap (N,) = v_H. Returns (H, N).
    r_t is the reward predicted for state t (DreamerV2 convention; DreamerV3 would use r_{t+1})."""
    next_value = torch.cat([value[1:], bootstrap[None]], 0)
    inputs = reward + disc * next_value * (1 - lam)
    ret, out = bootstrap, []
    for t in reversed(range(reward.shape[0])):
        ret = inputs[t] + disc[t] * lam * ret
        out.append(ret)
    return torch.stack(out[::-1])


class TruncNormal:
    """[DreamerV2 TruncNormalDist] Normal(mean, std) truncated to [low, high], independent over the last axis.
    rsample: inverse CDF x = mean + std ndtri(Phi(a) + u (Phi(b) - Phi(a))), a, b the standardised bounds
    (differentiable in mean and std), then DreamerV2's straight-through clip into [low + 1e-6, high - 1e-6]."""

    def __init__(self, mean, std, low=-1.0, high=1.0):
        mean, std = f32(mean), f32(std)  # (the distribution in float32 under --precision bf16)
        self.mean, self.std, self.low, self.high = mean, std, low, high
        self.a, self.b = (low - mean) / std, (high - mean) / std
        self.cdf_a, self.cdf_b = torch.special.ndtr(self.a), torch.special.ndtr(self.b)
        self.Z = self.cdf_b - self.cdf_a  # mass inside the bounds

    def rsample(self):
        u = torch.rand_like(self.mean)
        # DEVIATION: inverse-CDF sampling with u's image clamped away from 0 and 1 (TFP: exact, implicit gradients)
        p = (self.cdf_a + u * self.Z).clamp(1e-6, 1 - 1e-6)
        x = self.mean + self.std * torch.special.ndtri(p)
        clipped = x.clamp(self.low + 1e-6, self.high - 1e-6)
        return x + (clipped - x).detach()

    def log_prob(self, x):  # (..., A) -> (...)
        z = (x - self.mean) / self.std
        return (-0.5 * z ** 2 - HALF_LOG_2PI - torch.log(self.std) - torch.log(self.Z)).sum(-1)

    def entropy(self):  # (...), analytic: ln(sqrt(2 pi e) std Z) + (a phi(a) - b phi(b)) / (2 Z)
        phi = lambda v: torch.exp(-0.5 * v ** 2 - HALF_LOG_2PI)  # noqa: E731
        ent = (HALF_LOG_2PI + 0.5 + torch.log(self.std * self.Z)
               + (self.a * phi(self.a) - self.b * phi(self.b)) / (2 * self.Z))
        return ent.sum(-1)

    @property
    def mode(self):
        return self.mean.clamp(self.low, self.high)


class OneHot:
    """[DreamerV2 OneHotDist] a categorical over A actions as one-hot vectors; rsample is straight-through."""

    def __init__(self, logits):
        logits = f32(logits)  # (the distribution in float32 under --precision bf16)
        self.logits, self.logp = logits, F.log_softmax(logits, -1)

    def rsample(self):
        return sample_onehot(self.logits)

    def log_prob(self, x):  # (..., A) one-hot -> (...)
        return (x * self.logp).sum(-1)

    def entropy(self):
        return -(self.logp.exp() * self.logp).sum(-1)

    @property
    def mode(self):
        return F.one_hot(self.logits.argmax(-1), self.logits.shape[-1]).to(self.logits.dtype)


def init_weights(m):
    """Keras defaults of the official code: Glorot-uniform kernels, zero biases."""
    if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.xavier_uniform_(m.weight)
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


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d with float32 batch and running statistics (under --precision bf16 its input is bfloat16)."""

    def forward(self, x):
        return super().forward(f32(x))


def mlp(inp, units, layers, out):
    """[DreamerV2 common.MLP] `layers` x (Linear + ELU), no norm, then a Linear to `out`."""
    sizes = [inp] + [units] * layers
    return nn.Sequential(*[m for i in range(layers) for m in (nn.Linear(sizes[i], units), nn.ELU())],
                         nn.Linear(sizes[-1], out))


class Encoder(nn.Module):
    """[DreamerV2 Encoder, BLAST Sec. 2.3.3] 4 x (Conv k4 s2 valid [+ BatchNorm] + ELU), 64x64 -> 2x2, flatten."""

    def __init__(self, channels, depth, batch_norm):
        super().__init__()
        layers, c_in = [], channels
        for c_out in (depth, 2 * depth, 4 * depth, 8 * depth):
            norm = [BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)] if batch_norm else []
            layers, c_in = layers + [nn.Conv2d(c_in, c_out, 4, 2), *norm, nn.ELU()], c_out
        self.net, self.out_dim = nn.Sequential(*layers), c_in * 2 * 2

    def forward(self, obs):  # (..., 3, 64, 64) uint8 -> (..., E); BatchNorm statistics over all B*T images
        x = obs.reshape(-1, *obs.shape[-3:]).float() / 255.0 - 0.5
        return self.net(x).reshape(*obs.shape[:-3], -1)


class Decoder(nn.Module):
    """[DreamerV2 Decoder] Linear to 32*depth at 1x1, ConvTranspose k5 k5 k6 k6 s2 (ELU but the last): 1->5->13->30->64."""

    def __init__(self, feat_dim, channels, depth):
        super().__init__()
        self.inp, self.c0 = nn.Linear(feat_dim, 32 * depth), 32 * depth
        self.net = nn.Sequential(nn.ConvTranspose2d(32 * depth, 4 * depth, 5, 2), nn.ELU(),
                                 nn.ConvTranspose2d(4 * depth, 2 * depth, 5, 2), nn.ELU(),
                                 nn.ConvTranspose2d(2 * depth, depth, 6, 2), nn.ELU(),
                                 nn.ConvTranspose2d(depth, channels, 6, 2))

    def forward(self, feat):  # (..., F) -> (..., C, 64, 64): the mean of N(o_t / 255 - 0.5, 1)
        x = self.net(self.inp(feat.reshape(-1, feat.shape[-1])).reshape(-1, self.c0, 1, 1))
        return x.reshape(*feat.shape[:-1], *x.shape[1:])


class GRUCell(nn.Module):
    """[DreamerV2 GRUCell] one Linear for the three gates + LayerNorm, update bias -1, tanh candidate."""

    def __init__(self, inp, size):
        super().__init__()
        self.linear, self.norm = nn.Linear(inp + size, 3 * size), LayerNorm(3 * size, eps=LN_EPS)

    def forward(self, x, state):  # (..., inp), (..., size) -> (..., size)
        reset, cand, update = self.norm(self.linear(torch.cat([x, state], -1))).chunk(3, -1)
        update = torch.sigmoid(update - 1.0)
        return update * torch.tanh(torch.sigmoid(reset) * cand) + (1 - update) * state


class RSSM(nn.Module):
    """[BLAST Eq. 2.2, DreamerV2 RSSM] with the optional autoregressive prior of BLAST Sec. 2.3.2.

    recurrent model      h_t = f(h_{t-1}, z_{t-1}, a_{t-1})      (img_in + LayerNorm GRU)
    representation       z_t ~ q(z_t | h_t, x_t)                   (obs_out [+ BatchNorm] + obs_dist)
    transition predictor z^_t ~ p(z^_t | h_t)                      (img_out + img_dist; AR: ar_in, ar_sample_in, ar_cell)
    """

    def __init__(self, deter, stoch, classes, hidden, action_dim, embed_dim, batch_norm, ar_steps):
        super().__init__()
        self.deter, self.stoch, self.classes, self.ar_steps = deter, stoch, classes, ar_steps
        self.chunk = stoch // ar_steps  # C latents per AR step
        self.img_in = nn.Sequential(nn.Linear(stoch * classes + action_dim, hidden), nn.ELU())
        self.gru = GRUCell(hidden, deter)
        norm = [BatchNorm1d(hidden, eps=BN_EPS, momentum=BN_MOMENTUM)] if batch_norm else []
        self.obs_out = nn.Sequential(nn.Linear(deter + embed_dim, hidden), *norm, nn.ELU())
        self.obs_dist = nn.Linear(hidden, stoch * classes)
        self.img_out = nn.Sequential(nn.Linear(deter if ar_steps == 1 else hidden, hidden), nn.ELU())
        self.img_dist = nn.Linear(hidden, stoch * classes)
        if ar_steps > 1:  # [BLAST Sec. 2.3.2] layers shared across the AR steps
            self.ar_in = nn.Sequential(nn.Linear(deter, hidden), nn.ELU())
            self.ar_sample_in = nn.Sequential(nn.Linear(self.chunk * classes, hidden), nn.ELU())
            self.ar_cell = GRUCell(hidden, deter)

    def initial(self, n, device):  # DreamerV2's zero initial state: (n, D), (n, S, K)
        return torch.zeros(n, self.deter, device=device), torch.zeros(n, self.stoch, self.classes, device=device)

    def recurrent(self, deter, stoch, action):  # h_t = GRU(h_{t-1}, img_in([z_{t-1}, a_{t-1}]))
        return self.gru(self.img_in(torch.cat([stoch.flatten(-2), action], -1)), deter)

    def post_logits(self, deter, embed):  # (..., D), (..., E) -> (..., S, K)
        return self.obs_dist(self.obs_out(torch.cat([deter, embed], -1))).unflatten(-1, (self.stoch, self.classes))

    def prior(self, deter, teacher=None):
        """p(z_t | h_t): (..., D) -> logits (..., S, K) and a sample z^_t (..., S, K). ar_steps 1: one head on h_t.

        [BLAST Sec. 2.3.2] AR prior: a separate GRU seeded with h_t emits the latents chunk by chunk; chunk i+1 is
        conditioned on `teacher`'s chunk i (training: sg(target posterior)), else on its own sample (imagination).
        """
        if self.ar_steps == 1:
            logits = self.img_dist(self.img_out(deter)).unflatten(-1, (self.stoch, self.classes))
            return logits, sample_onehot(logits)
        C, K, W, b = self.chunk, self.classes, self.img_dist.weight, self.img_dist.bias
        x = state = deter
        logits, samples = [], []
        for i in range(self.ar_steps):
            rows = slice(i * C * K, (i + 1) * C * K)  # DEVIATION: only this chunk's logits (same values)
            logit = F.linear(self.img_out(self.ar_in(x)), W[rows], b[rows]).unflatten(-1, (C, K))  # (..., C, K)
            logits.append(logit), samples.append(sample_onehot(logit))
            if i == self.ar_steps - 1:
                break  # the official code runs one more AR GRU step whose output nothing reads
            nxt = samples[-1] if teacher is None else teacher[..., i * C:(i + 1) * C, :]
            x = state = self.ar_cell(self.ar_sample_in(nxt.flatten(-2)), state)
        return torch.cat(logits, -2), torch.cat(samples, -2)

    def obs_step(self, deter, stoch, prev_action, embed, is_first):
        """One posterior step: zero state and action where is_first, h_t = f(...), z_t ~ q(z_t | h_t, x_t)."""
        keep = (~is_first).to(deter.dtype)[:, None]  # (B, 1)
        deter = self.recurrent(deter * keep, stoch * keep[..., None], prev_action * keep)
        logits = self.post_logits(deter, embed)
        return deter, sample_onehot(logits), logits

    def observe(self, embed, action, is_first):
        """Posterior states of a (B, T) sequence; step t consumes action[:, t-1]. Returns deter (B, T, D),
        stoch (B, T, S, K), post logits (B, T, S, K); the prior comes afterwards from deter, so that its inputs can be mixed.
        """
        B, T = is_first.shape
        # Zero state, as DreamerV2's replay marks each window's first step is_first. DEVIATION: windows may cross
        # episode starts (reset at is_first); DreamerV2 samples each window within one episode
        deter, stoch = self.initial(B, embed.device)
        prev_action = torch.cat([torch.zeros_like(action[:, :1]), action[:, :-1]], 1)  # a_{t-1}
        deters, stochs, logits = [], [], []
        for t in range(T):  # BatchNorm in obs_out: statistics of the B states of step t
            deter, stoch, logit = self.obs_step(deter, stoch, prev_action[:, t], embed[:, t], is_first[:, t])
            deters.append(deter), stochs.append(stoch), logits.append(logit)
        return torch.stack(deters, 1), torch.stack(stochs, 1), torch.stack(logits, 1)

    def img_step(self, deter, stoch, action):
        """One imagined step: h_t = f(h_{t-1}, z_{t-1}, a_{t-1}), z^_t ~ p(z^_t | h_t) free-running (no teacher)."""
        deter = self.recurrent(deter, stoch, action)
        return deter, self.prior(deter)[1]


class WorldModel(nn.Module):
    """Encoder, its EMA target (+EMA), RSSM, reward head, decoder (own optimiser)."""

    def __init__(self, obs_shape, action_dim, deter, stoch, classes, hidden, units, mlp_layers, cnn_depth,
                 batch_norm, ar_steps, target_encoder):
        super().__init__()
        self.encoder = Encoder(obs_shape[0], cnn_depth, batch_norm)
        self.rssm = RSSM(deter, stoch, classes, hidden, action_dim, self.encoder.out_dim, batch_norm, ar_steps)
        feat_dim = deter + stoch * classes
        self.reward = mlp(feat_dim, units, mlp_layers, 1)  # [DreamerV2 reward_head] 4 x 400 ELU, unit Normal
        self.decoder = Decoder(feat_dim, obs_shape[0], cnn_depth)
        self.apply(init_weights)
        # [BLAST Sec. 2.3.1] target encoder xi (parameters overwritten by the first EMA update); None: the online one
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False) if target_encoder else None

    @property
    def act_encoder(self):  # what acting and pictures use (BLAST: the target encoder)
        return self.encoder if self.target_encoder is None else self.target_encoder

    def model_parameters(self):  # what the model optimiser trains: all but the target encoder and the decoder
        return [p for n, p in self.named_parameters() if not n.startswith(("target_encoder.", "decoder."))]


def feature(deter, stoch):  # s_t = [h_t, flatten(z_t)]: (..., D), (..., S, K) -> (..., F)
    return torch.cat([deter, stoch.flatten(-2)], -1)


class Actor(nn.Module):
    """[DreamerV2 actor] pi(a_t | s_t) = TruncNormal(tanh(mu), 2 sigmoid(sigma / 2) + min_std) on [-1, 1];
    discrete actions (actor.dist onehot): OneHot(logits)."""

    def __init__(self, feat_dim, action_dim, units, layers, min_std, discrete=False):
        super().__init__()
        self.action_dim, self.min_std, self.discrete = action_dim, min_std, discrete
        self.net = mlp(feat_dim, units, layers, action_dim if discrete else 2 * action_dim).apply(init_weights)

    def forward(self, feat):  # (..., F) -> TruncNormal or OneHot over (..., A)
        if self.discrete:
            return OneHot(self.net(feat))
        mean, std = f32(self.net(feat)).chunk(2, -1)  # (the distribution in float32 under --precision bf16)
        return TruncNormal(torch.tanh(mean), 2 * torch.sigmoid(std / 2) + self.min_std)


class Critic(nn.Module):
    """[DreamerV2 critic] v(s_t), the mean of a unit Normal ('mse' dist): 4 x 400 ELU."""

    def __init__(self, feat_dim, units, layers):
        super().__init__()
        self.net = mlp(feat_dim, units, layers, 1).apply(init_weights)

    def forward(self, feat):  # (..., F) -> (...)
        return self.net(feat)[..., 0]


def make_agent(args, obs_shape, action_dim, device, discrete=False):
    """World model, actor, critic, slow critic and the four optimisers (model, actor, critic, decoder)."""
    # ABLATION(batch_norm) ABLATION(ar_steps) ABLATION(target_encoder): the model's structure
    wm = WorldModel(obs_shape, action_dim, args.deter, args.stoch, args.classes, args.hidden, args.units,
                    args.mlp_layers, args.cnn_depth, args.batch_norm, args.ar_steps, args.target_encoder).to(device)
    feat_dim = args.deter + args.stoch * args.classes
    actor = Actor(feat_dim, action_dim, args.units, args.mlp_layers, args.actor_min_std, discrete).to(device)
    critic = Critic(feat_dim, args.units, args.mlp_layers).to(device)
    # DEVIATION: the slow critic starts as a copy (official: own init, copied after update 0)
    slow_critic = copy.deepcopy(critic).requires_grad_(False)
    opts = (torch.optim.Adam(wm.model_parameters(), lr=args.model_lr, eps=args.model_eps),  # DEVIATION: torch's eps
            torch.optim.Adam(actor.parameters(), lr=args.actor_lr, eps=args.ac_eps),
            torch.optim.Adam(critic.parameters(), lr=args.critic_lr, eps=args.ac_eps),
            # DEVIATION: the decoder has its own optimiser and clip (official: the model's, one global clip)
            torch.optim.Adam(wm.decoder.parameters(), lr=args.model_lr, eps=args.model_eps))
    return wm, actor, critic, slow_critic, opts


# --- Losses and the update step --------------------------------------------------------------
def world_model_loss(wm, data, kl_balance, kl_free, kl_scale, reward_scale, image_scale, target_input_p,
                     reconstruction, reward_grad):
    """[BLAST Eq. 2.4] (Eq. 2.3, DreamerV2's, with --reconstruction and without the target encoder) on a (B, T) batch.
    Returns (loss incl. the decoder's, metrics, outputs: prior logits, target posterior, mixed features)."""
    obs, action, is_first = data["obs"], data["action"], data["is_first"]
    B = obs.shape[0]
    embed = wm.encoder(obs)  # (B, T, E)
    deter, stoch, post = wm.rssm.observe(embed, action, is_first)  # online posterior q_theta
    if wm.target_encoder is not None:
        with torch.no_grad():
            target_embed = wm.target_encoder(obs)  # (B, T, E), batch statistics (training=True in the official code)
        # [BLAST Sec. 2.3.1] target posterior q_xi: target embeddings through the same (online) RSSM
        t_deter, t_stoch, t_post = wm.rssm.observe(target_embed, action, is_first)
        # [BLAST Sec. 2.3.2] the first B (1 - p) rows keep the online posterior, the rest take the target one
        # (the batch-axis split of the official code); these states feed the prior and the reward head
        n = int(B * (1 - target_input_p))
        deter, stoch = torch.cat([deter[:n], t_deter[n:]]), torch.cat([stoch[:n], t_stoch[n:]])
        kl_post = t_post.detach()  # [BLAST Eq. 2.4] KL(sg(q_xi) || p_theta)
    else:
        t_deter, t_stoch, t_post = deter, stoch, post  # DEVIATION: an AR prior is teacher-forced on sg(q_theta) here
        kl_post = post
    # [BLAST Sec. 2.3.2] prior from each h_t, teacher-forced on sg(target posterior sample) chunks
    prior, _ = wm.rssm.prior(deter, teacher=t_stoch.detach())  # (B, T, S, K)
    # [BLAST Eq. 2.4, DreamerV2 KL balancing] ABLATION(kl_balance)
    kl, kl_value = kl_loss(kl_post, prior, kl_balance, kl_free)
    feat = feature(deter, stoch)  # (B, T, F)
    # [BLAST Eq. 2.4] -ln p(r_t | s_t), unit Normal; A.3: no reward gradient into s_t. ABLATION(reward_grad)
    reward = gaussian_nll(f32(wm.reward(feat if reward_grad else feat.detach())[..., 0]), data["reward"]).mean()
    # [BLAST Eq. 2.3] -ln p(o_t | s_t), unit Normal summed over pixels; -recon: the decoder sees sg(s_t)
    recon_in = feat if reconstruction else feat.detach()  # ABLATION(reconstruction)
    image = gaussian_nll(f32(wm.decoder(recon_in)), obs.float() / 255.0 - 0.5).sum((-3, -2, -1)).mean()
    # As in the official code the decoder term is always in the loss; with sg(s_t) it reaches only the decoder.
    loss = kl_scale * kl + reward_scale * reward + image_scale * image
    metrics = {"losses/kl": kl.detach(), "losses/reward": reward.detach(), "losses/image": image.detach(),
               "losses/world_model": loss.detach(), "stats/kl": kl_value,
               "stats/prior_entropy": categorical_entropy(prior), "stats/posterior_entropy": categorical_entropy(t_post)}
    outputs = dict(prior=prior, t_deter=t_deter.detach(), t_stoch=t_stoch.detach(), t_post=t_post.detach(), feat=feat)
    return loss, metrics, outputs


def imagine(rssm, actor, deter, stoch, horizon):
    """Roll the free-running prior H steps from N start states with a_t ~ pi(a_t | sg(s_t)) (rsample).
    Returns feat (H+1, N, F) for s_0..s_H, the actor entropies and ln pi(sg(a_t) | s_t) (H, N) at s_0..s_{H-1}."""
    feats, ents, logps = [feature(deter, stoch)], [], []
    for _ in range(horizon):
        dist = actor(feats[-1].detach())  # [DreamerV2] the actor sees sg(s_t)
        action = dist.rsample()
        deter, stoch = rssm.img_step(deter, stoch, action)
        feats.append(feature(deter, stoch)), ents.append(dist.entropy()), logps.append(dist.log_prob(action.detach()))
    return torch.stack(feats), torch.stack(ents), torch.stack(logps)


def actor_critic_loss(wm, actor, critic, slow_critic, deter, stoch, horizon, gamma, lam, entropy_scale,
                      reinforce=False):
    """[DreamerV2 ActorCritic] dynamics backprop (or REINFORCE) actor and MSE critic on trajectories from N starts.

        states   s_0  s_1 ... s_H        rewards r_t = reward(s_t), values v_targ(s_t) (slow critic)
        targets  V_0  V_1 ... V_{H-1}    weights w_t = gamma^t (no discount head: d_t = gamma)
        actor    -mean_t w_t (V_{t+1} + eta H[pi(. | s_t)]),  t = 0..H-2 (V_0 does not depend on any action)
        reinforce: V_{t+1} above -> ln pi(sg(a_t) | s_t) sg(V_{t+1} - v_targ(s_t))
        critic   mean_t w_t -ln N(sg(V_t); v(sg(s_t)), 1),    t = 0..H-1
    deter (N, D), stoch (N, S, K). Returns (actor_loss, critic_loss, metrics).
    """
    feat, ent, logp = imagine(wm.rssm, actor, deter, stoch, horizon)  # (H+1, N, F), (H, N), (H, N)
    reward = f32(wm.reward(feat)[..., 0])  # (H+1, N) r_0..r_H, the mode of the unit Normal (lambda-returns in float32)
    value = f32(slow_critic(feat))  # (H+1, N); its parameters are frozen but the gradient reaches the actions
    disc = torch.full_like(reward, gamma)  # pred_discount False (BLAST A.2)
    # [DreamerV2 lambda-target] lambda_return(reward[:-1], value[:-1], disc[:-1], bootstrap=value[-1])
    ret = lambda_return(reward[:-1], value[:-1], disc[:-1], value[-1], lam)  # (H, N)
    weight = torch.cumprod(torch.cat([torch.ones_like(disc[:1]), disc[:-1]]), 0).detach()  # (H+1, N)
    if reinforce:  # [DreamerV2 actor_grad reinforce] baseline v_targ(s_t); DEVIATION: the score of sg(a_t), see 8.
        objective = logp[:-1] * (ret[1:] - value[:-2]).detach()
    else:  # [DreamerV2 actor loss, actor_grad dynamics] maximise V^lambda by backpropagating through the dynamics
        objective = ret[1:]
    actor_loss = -(weight[:-2] * (objective + entropy_scale * ent[:-1])).mean()
    # [DreamerV2 critic loss] the critic regresses sg(V^lambda) on sg(s_t)
    critic_loss = (weight[:-1] * gaussian_nll(f32(critic(feat[:-1].detach())), ret.detach())).mean()
    metrics = {"losses/actor": actor_loss.detach(), "losses/critic": critic_loss.detach(),
               "stats/actor_entropy": ent.mean().detach(), "stats/imagined_return": ret.mean().detach(),
               "stats/imagined_reward": reward.mean().detach()}
    return actor_loss, critic_loss, metrics


@torch.no_grad()
def ema_update(target, online, decay):
    """[BLAST Sec. 2.3.1] xi <- decay xi + (1 - decay) theta, parameters only (BatchNorm running statistics stay the target's)."""
    for p_t, p in zip(target.parameters(), online.parameters()):
        p_t.lerp_(p, 1.0 - decay)


@torch.no_grad()
def slow_critic_update(slow_critic, critic, updates, every):
    """[DreamerV2 slow_target] hard copy critic -> slow critic when updates % every == 0 (update 0 included)."""
    if updates % every == 0:
        slow_critic.load_state_dict(critic.state_dict())


def opt_step(opt, params, clip, weight_decay):
    """[DreamerV2 common.Optimizer] clip the global grad norm, decay w <- (1 - wd) w, then the Adam step."""
    norm = nn.utils.clip_grad_norm_(params, clip)
    with torch.no_grad():
        torch._foreach_mul_(params, 1.0 - weight_decay)
    opt.step()
    return norm


COMPILED = {}  # --compile: the loss functions compiled once per process


def loss_fns(compile, backend="inductor"):
    """(world_model_loss, actor_critic_loss), or with --compile their torch.compile'd versions.

    Each loss is compiled whole: its T-step posterior loops (online and target), the AR prior's chunk loop and the
    H-step imagination are unrolled into one graph, and AOTAutograd compiles the backward pass with it; shapes are
    fixed (dynamic=False), so the first call compiles and later calls replay. BatchNorm's batch statistics and its
    running-statistics updates (online and target encoder) are in the graph. The backward calls, gradient clipping,
    weight decay, Adam steps, the target encoder's EMA and the slow critic's copies stay eager. Sampling inside the
    compiled graphs uses inductor's random numbers (same distributions, other draws than eager for one seed).
    Default mode on every device: CUDA graphs (mode="reduce-overhead") are not used, since no GPU was at hand to
    test them (metrics kept across updates would need copies out of the graphs' memory).
    """
    if not compile:
        return world_model_loss, actor_critic_loss
    if backend not in COMPILED:  # fullgraph: a graph break is an error, not a silent slow path
        COMPILED[backend] = (torch.compile(world_model_loss, dynamic=False, fullgraph=True, backend=backend),
                             torch.compile(actor_critic_loss, dynamic=False, fullgraph=True, backend=backend))
    return COMPILED[backend]


def update(wm, actor, critic, slow_critic, opts, data, args, updates):
    """One training update (world model, target EMA, actor, critic, slow critic). No host syncs. `updates`: the
    number of updates before this one (a Python int scheduling the first EMA copy and the slow critic's copies)."""
    wm_opt, actor_opt, critic_opt, dec_opt = opts
    world_model_loss_fn, actor_critic_loss_fn = loss_fns(args.compile, args.compile_backend)
    if args.reward_clamp == "tanh":  # [DreamerV2 clip_rewards, BLAST A.2 reward_clamp] on the replayed rewards
        data = dict(data, reward=torch.tanh(data["reward"]))
    # DEVIATION: float32 by default (the official code uses mixed float16); --precision bf16: autocast the forward
    # passes (backward, optimiser steps, the target EMA and the slow critic copy stay outside, parameters float32)
    device_type, low = data["obs"].device.type, args.precision == "bf16"
    with torch.autocast(device_type, torch.bfloat16, enabled=low):
        wm_loss, metrics, out = world_model_loss_fn(
            wm, data, args.kl_balance, args.kl_free, args.kl_scale, args.reward_scale, args.image_scale,
            args.target_input_p, args.reconstruction, args.reward_grad)
    wm_opt.zero_grad(set_to_none=True), dec_opt.zero_grad(set_to_none=True)
    wm_loss.backward()
    metrics["grad_norm/world_model"] = opt_step(wm_opt, wm.model_parameters(), args.model_clip, args.weight_decay)
    metrics["grad_norm/decoder"] = opt_step(dec_opt, list(wm.decoder.parameters()), args.model_clip, args.weight_decay)
    if wm.target_encoder is not None:  # DEVIATION: update 0 copies theta (official: keeps xi's own random init)
        ema_update(wm.target_encoder, wm.encoder, 0.0 if updates == 0 else args.target_ema)

    # Behaviour from all B*T target posteriors (BLAST: imagination starts from target_posts); wm frozen
    wm.requires_grad_(False)
    with torch.autocast(device_type, torch.bfloat16, enabled=low):
        actor_loss, critic_loss, ac_metrics = actor_critic_loss_fn(
            wm, actor, critic, slow_critic, out["t_deter"].flatten(0, 1), out["t_stoch"].flatten(0, 1),
            args.imag_horizon, args.gamma, args.lam, args.actor_entropy,
            args.actor_grad == "reinforce" or (args.actor_grad == "auto" and actor.discrete))
    for p in wm.model_parameters() + list(wm.decoder.parameters()):
        p.requires_grad_(True)  # (the target encoder stays frozen)
    metrics.update(ac_metrics)
    actor_opt.zero_grad(set_to_none=True), critic_opt.zero_grad(set_to_none=True)
    # Each loss reaches only its own network (wm and slow critic frozen, the critic sees sg(s_t)); retain_graph: a
    # compiled actor_critic_loss is one autograd node for both losses, whose first backward would free it
    actor_loss.backward(inputs=list(actor.parameters()), retain_graph=True)
    critic_loss.backward(inputs=list(critic.parameters()))
    metrics["grad_norm/actor"] = opt_step(actor_opt, list(actor.parameters()), args.ac_clip, args.weight_decay)
    metrics["grad_norm/critic"] = opt_step(critic_opt, list(critic.parameters()), args.ac_clip, args.weight_decay)
    slow_critic_update(slow_critic, critic, updates, args.slow_critic_every)
    return metrics


def batch_to(batch, device):
    """A replay batch (numpy arrays) as tensors on `device`; on CUDA through pinned memory with non-blocking copies,
    so the host does not wait for the copy (the update's kernels queue behind it on the same stream)."""
    if device.type != "cuda":
        return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
    return {k: torch.from_numpy(v).pin_memory().to(device, non_blocking=True) for k, v in batch.items()}


# --- Acting, evaluation, pictures ------------------------------------------------------------
@torch.no_grad()
def policy(wm, actor, state, obs, is_first, explore=True):
    """Filter o_t into the posterior with the acting (target) encoder, then a_t ~ pi (explore) or its mode."""
    deter, stoch, prev_action = state
    deter, stoch, _ = wm.rssm.obs_step(deter, stoch, prev_action, wm.act_encoder(obs), is_first)
    dist = actor(feature(deter, stoch))
    action = dist.rsample() if explore else dist.mode  # DreamerV2: sample when training, mode when evaluating
    return action, (deter, stoch, action)


def initial_state(wm, actor, n, device):  # acting state (h, z, previous action) of n envs: zeros (DreamerV2)
    return (*wm.rssm.initial(n, device), torch.zeros(n, actor.action_dim, device=device))


def set_mode(training, *modules):  # [BLAST code] act with BatchNorm in eval mode (running statistics)
    for m in modules:
        m.train(training)


def to_env(action, discrete):
    """Policy output (N, A) -> what the vector env takes (indices for Discrete spaces). A non-finite action (a network
    diverged) stops the run here, as one error line, before the simulator fails on it with a PhysicsError."""
    action = action.cpu().numpy()
    if not np.isfinite(action).all():
        raise FloatingPointError("non-finite action from the policy: a network diverged in an update since the last log")
    return action.argmax(-1) if discrete else action


def evaluate(wm, actor, envs, episodes, device, capture=False):
    """Mean return of `episodes` episodes on the evaluation envs; with `capture`, env 0's first episode as
    (T, S, W, 3) uint8 video frames (common/envs.py video_frame)."""
    set_mode(False, wm, actor)
    state, (obs, _) = initial_state(wm, actor, envs.num_envs, device), envs.reset()
    is_first, done, returns, frames = np.ones(envs.num_envs, bool), np.zeros(envs.num_envs, bool), [], []
    while len(returns) < episodes:
        if capture and not returns:
            frames.append(envs.call("video_frame")[0])
        action, state = policy(wm, actor, state, torch.as_tensor(obs, device=device),
                               torch.as_tensor(is_first, device=device), explore=False)
        obs, _, term, trunc, infos = envs.step(to_env(action, actor.discrete))
        is_first, done = done, term | trunc  # NEXT_STEP autoreset: the obs after a done step is the first
        if "episode" in infos:
            returns += [float(r) for r, m in zip(infos["episode"]["r"], infos["_episode"]) if m]
    set_mode(True, wm, actor)
    return returns[:episodes], np.stack(frames) if frames else None


@torch.no_grad()
def openloop_video(wm, actor, data, context, n=4):
    """[DreamerV2 video_pred] `context` observed frames, then the free-running prior with the real actions.
    Returns (T, 3*64, n*64, C) uint8 frames: real on top, model in the middle, error at the bottom."""
    set_mode(False, wm, actor)
    obs, action = data["obs"][:n], data["action"][:n]
    deter, stoch, _ = wm.rssm.observe(wm.act_encoder(obs[:, :context]), action[:, :context],
                                      data["is_first"][:n, :context])
    d, s, feats = deter[:, -1], stoch[:, -1], [feature(deter, stoch)]
    for t in range(context, obs.shape[1]):
        d, s = wm.rssm.img_step(d, s, action[:, t - 1])  # s_t from s_{t-1} and a_{t-1}
        feats.append(feature(d, s)[:, None])
    model = (wm.decoder(torch.cat(feats, 1)) + 0.5).clamp(0, 1)  # (n, T, C, H, W)
    truth = obs.float() / 255.0
    video = torch.cat([truth, model, (model - truth + 1) / 2], 3)  # stack rows along H
    set_mode(True, wm, actor)
    video = torch.cat(list(video), 3)  # (T, C, 3H, nW): sequences side by side
    return (video.permute(0, 2, 3, 1) * 255).to(torch.uint8).cpu().numpy()


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
# Flags a resumed run may change: they touch neither the model nor the training schedule (evaluations and videos
# draw from the torch RNG, so changing their flags changes the later random draws, not what the run is).
RESUMABLE = ("total_timesteps", "resume", "eval_checkpoint", "save_model", "checkpoint_every", "precision",
             "compile", "compile_backend", "track", "wandb_project_name", "wandb_entity", "cuda", "capture_video",
             "eval_every", "eval_episodes", "log_every", "video_every")
CHECKS = [  # (flag, condition on its value v and the args a, the error after `--flag`), checked in this order
    ("env_id", lambda v, a: is_pixel(v), "{v} is a state task; " + SCRIPT + " learns from 64x64 pixels (use a DMC id "
     "such as walker-walk)"),  # DreamerV2's conv encoder/decoder are built for 64x64 pixels
    ("precision", lambda v, a: v in ("fp32", "bf16"), "must be one of fp32, bf16, got {v}"),
    ("compile_backend", lambda v, a: v in ("inductor", "aot_eager"), "must be one of inductor, aot_eager, got {v}"),
    *[(f, lambda v, a, low=low: v >= low, f"must be >= {low}, got {{v}}") for f, low in dict(
        seed=0, total_timesteps=1, num_envs=1, eval_episodes=1, eval_every=1, log_every=1, action_repeat=1,
        batch_size=2, batch_length=2, prefill=0, pretrain=0, train_every=1, deter=1, hidden=1, stoch=1, classes=1,
        cnn_depth=1, units=1, mlp_layers=0, ar_steps=1, imag_horizon=2, slow_critic_every=1, video_every=0).items()],
    *[(f, lambda v, a: v > 0, "must be > 0, got {v}") for f in (
        "model_lr", "actor_lr", "critic_lr", "model_eps", "ac_eps", "actor_min_std", "model_clip", "ac_clip")],
    *[(f, lambda v, a: 0 <= v <= 1, "must lie in [0, 1], got {v}") for f in ("kl_balance", "target_ema",
                                                                             "target_input_p", "lam")],
    ("checkpoint_every", lambda v, a: v >= 0, "must be >= 0 (0: no checkpoints), got {v}"),
    ("resume", lambda v, a: not (v and a.eval_checkpoint), "and --eval-checkpoint exclude each other"),
    ("video_context", lambda v, a: 0 < v < a.batch_length, "must lie in [1, --batch-length {a.batch_length}), got {v}"),
    ("buffer_size", lambda v, a: v >= a.batch_size * a.batch_length,
     "must hold one batch (--batch-size {a.batch_size} x --batch-length {a.batch_length} steps), got {v}"),
    ("ar_steps", lambda v, a: a.stoch % v == 0, "must divide --stoch {a.stoch}, got {v}"),
    ("gamma", lambda v, a: 0 < v <= 1, "must lie in (0, 1], got {v}"),
    ("kl_free", lambda v, a: v >= 0, "must be >= 0, got {v}"),
    ("weight_decay", lambda v, a: 0 <= v < 1, "must lie in [0, 1), got {v}"),
    ("reward_clamp", lambda v, a: v in ("identity", "tanh"), "must be identity|tanh, got {v!r}"),
    ("actor_grad", lambda v, a: v in ("auto", "dynamics", "reinforce"), "must be auto|dynamics|reinforce, got {v!r}"),
]


def fail(msg):  # bad input: one line `error: ...` on stderr and exit code 2 (a command-line error), no traceback
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def apply_ladder(args):
    """[BLAST Figs. 3-4] `--ladder RUNG` sets the five switches; each rung adds one change to the previous one."""
    if args.ladder is None:
        return args
    if args.ladder not in LADDER:
        fail(f"--ladder must be one of {'|'.join(LADDER)}, got {args.ladder!r}")
    rung = LADDER.index(args.ladder)
    return dataclasses.replace(args, reconstruction=rung < 1, kl_balance=0.8 if rung < 2 else 1.0,
                               target_encoder=rung >= 3, batch_norm=rung >= 4, ar_steps=args.stoch if rung >= 5 else 1)


def apply_preset(args):
    """`--preset NAME` sets PRESETS[NAME] where args still hold Args' defaults (a flag given explicitly wins unless it
    repeats the default); ar_steps left at its default follows stoch (A.2 "same as rssm.stoch")."""
    if args.preset is None:
        return args
    if args.preset not in PRESETS:
        fail(f"--preset must be one of {'|'.join(PRESETS)}, got {args.preset!r}")
    default = Args()
    out = dataclasses.replace(args, **{k: v for k, v in PRESETS[args.preset].items()
                                       if getattr(args, k) == getattr(default, k)})
    return dataclasses.replace(out, ar_steps=out.stoch) if args.ar_steps == default.ar_steps else out


def check_args(args):
    """Unset --action-repeat / --time-limit become the env's own (DMC 2 and 1000 frames, MiniGrid 1 and 100), then
    CHECKS in order, before any heavy work: the first bad flag is named with its value."""
    try:
        args = dataclasses.replace(args, **{k: v for k, v in env_defaults(args.env_id).items() if getattr(args, k) is None})
    except ValueError as e:  # an unknown --env-id (with the closest valid ids)
        fail(e)
    for flag, ok, message in CHECKS:
        if not ok(getattr(args, flag), args):
            fail(f"--{flag.replace('_', '-')} " + message.format(v=getattr(args, flag), a=args))
    return args


def fmt_time(s):  # 12 s, 3.4 min, 5.6 h, or ? when unknown
    return "?" if not np.isfinite(s) else f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


class Progress:
    """The status line: at each log step and, from a heartbeat thread, after 30 s without output; rewritten in place
    on a terminal, plain lines elsewhere (CI, SLURM logs). Rates and ETA come from the current phase (prefill,
    pretrain, train) over its last `window_s` seconds; the pretrain phase ends at an update count, the others at a
    frame count."""

    def __init__(self, total, window_s=120.0, clock=time.monotonic, out=sys.stdout):
        self.total, self.window_s, self.clock, self.out, self.last_print = total, window_s, clock, out, clock()
        self.frames, self.updates, self.recent, self.eval, self.stop = 0, 0, np.nan, np.nan, threading.Event()
        self.lock, self.thread = threading.Lock(), threading.Thread(target=self.beat, daemon=True)
        self.set_phase("setup", 0)

    def set_phase(self, phase, end):  # until frame `end` (pretrain: update `end`), its rates measured afresh
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


def save_checkpoint(path, args, nets, opts, loop, replay=None):
    """The checkpoint (module docstring), atomically: a temporary file, flushed and fsynced, then renamed; the replay's
    memory-mapped files are flushed first (the checkpoint holds their head, count and sampling RNG)."""
    if replay is not None:
        replay.flush()
    kind, key, *rest = np.random.get_state()
    rng = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(key.astype(np.int64)), *rest),
           "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    with open(path + ".tmp", "wb") as f:
        torch.save({"script": SCRIPT, "args": asdict(args), "nets": {k: m.state_dict() for k, m in nets.items()},
                    "opts": [o.state_dict() for o in opts], "loop": loop, "rng": rng,
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


def restore_checkpoint(ck, nets, opts, replay=None):
    """Networks, optimisers, the replay's head and sampling RNG, then every global RNG (last: nothing drawn while
    restoring shifts them). Returns the loop counters (`updates` schedules the slow critic's and target's copies)."""
    for k, m in nets.items():
        m.load_state_dict(ck["nets"][k])
    for o, state in zip(opts, ck["opts"], strict=True):
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


def checked_against(args, ck, flag):
    """Refuse flags that would change the saved run's model or schedule (all but RESUMABLE; an evaluation may also
    pick its own --seed and --num-envs), each named with both values. The saved args are --preset's and --ladder's."""
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
    them or when the file cannot be read: main then says why)."""
    for i, a in enumerate(argv):
        for flag in ("--resume", "--eval-checkpoint"):
            if a == flag and i + 1 < len(argv) or a.startswith(flag + "="):
                path = argv[i + 1] if a == flag else a.split("=", 1)[1]
                path = os.path.join(path, CHECKPOINT) if flag == "--resume" and not os.path.isfile(path) else path
                with contextlib.suppress(Exception):  # (another script's: main's load_checkpoint says so)
                    saved = torch.load(path, map_location="cpu", weights_only=True)
                    return Args(**{k: v for k, v in saved["args"].items() if k in Args.__dataclass_fields__
                                   and k not in ("resume", "eval_checkpoint")}) if saved["script"] == SCRIPT else None
    return None


def build_agent(args, obs_shape, action_dim, discrete, device):  # the networks by name (as saved), the four Adams
    wm, actor, critic, slow_critic, opts = make_agent(args, obs_shape, action_dim, device, discrete)
    return {"wm": wm, "actor": actor, "critic": critic, "slow_critic": slow_critic}, opts


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
    space, discrete = envs.single_action_space, hasattr(envs.single_action_space, "n")  # Discrete: one-hot actions
    return envs, (envs.single_observation_space.shape, int(space.n) if discrete else int(np.prod(space.shape)), discrete)


def evaluate_checkpoint(args):
    """--eval-checkpoint: the saved agent on --eval-episodes fresh evaluation episodes; prints the JSON line."""
    path, ck = args.eval_checkpoint, load_checkpoint(args.eval_checkpoint, "--eval-checkpoint")
    checked_against(args, ck, "--eval-checkpoint")
    (envs, spec), device = make_envs(args, "eval"), torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    torch.manual_seed(args.seed)
    nets, _ = build_agent(args, *spec, device)
    for k, m in nets.items():
        m.load_state_dict(ck["nets"][k])
    step = ck["loop"]["global_step"]
    print(f"{SCRIPT}: evaluating {path} (frame {step}) on {args.env_id} for {args.eval_episodes} episodes ...", flush=True)
    try:
        returns, frames = evaluate(nets["wm"], nets["actor"], envs, args.eval_episodes, device, args.capture_video)
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
    if not (args.resume or args.eval_checkpoint):  # a saved run's args are resolved already: never applied again
        args = apply_ladder(apply_preset(args))
    args = check_args(args)
    if args.eval_checkpoint:
        return evaluate_checkpoint(args)
    if args.resume and os.path.isfile(args.resume):  # RUN/checkpoint.pt: its folder is the run
        args = dataclasses.replace(args, resume=os.path.dirname(args.resume) or ".")
    if args.resume and not os.path.isdir(args.resume):
        fail(f"--resume {args.resume}: no such run directory (give the run's folder, e.g. runs/NAME)")
    ck = load_checkpoint(os.path.join(args.resume, CHECKPOINT), "--resume") if args.resume else None
    if ck:
        checked_against(args, ck, "--resume")
        if args.total_timesteps <= ck["loop"]["global_step"] <= ck["loop"]["eval_step"]:  # finished and evaluated
            return summary(ck["loop"], args.resume)  # (killed before its JSON line, say): nothing built or trained
    run_dir = args.resume or os.path.join("runs", f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}")
    replay_dir = os.path.join(run_dir, "replay") if args.checkpoint_every or ck else None  # memory-mapped files
    try:  # before anything is built or created (the frames dominate: action_dim 1)
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
    (wm, actor, critic, slow_critic), B, T, N = nets.values(), args.batch_size, args.batch_length, args.num_envs
    # Every loop counter in one namespace, which a checkpoint saves and restores whole
    loop = SimpleNamespace(global_step=0, updates=0, train_credit=0, pretrained=False, next_log=args.log_every,
                           next_eval=args.eval_every, next_video=args.video_every, metric_sums={}, n_metrics=0,
                           last_metrics={}, recent_returns=[], eval_return=np.nan, returns=[], eval_step=-1)
    if ck:  # networks, optimisers, counters, RNGs, replay head
        vars(loop).update(restore_checkpoint(ck, nets, opts, replay))
        loop.metric_sums = {k: v.to(device) for k, v in loop.metric_sums.items()}
        progress.print(f"resumed {run_dir} at frame {loop.global_step} after {loop.updates} updates (replay "
                       f"{len(replay)} steps); the episodes in progress when it stopped start afresh")
    loop.next_checkpoint = loop.global_step + args.checkpoint_every  # (--checkpoint-every may have changed)

    def evaluation():  # next_eval advances once it finished: an evaluation cut by a signal runs again after --resume
        phase, progress.phase = progress.phase, "eval"
        loop.returns, frames = evaluate(wm, actor, eval_envs, args.eval_episodes, device, args.capture_video)
        loop.eval_return = progress.eval = float(np.mean(loop.returns))
        writer.add_scalar("eval/episodic_return", loop.eval_return, loop.global_step)
        if frames is not None:
            encode_video(os.path.join(run_dir, "videos", f"eval_{loop.global_step}.mp4"), frames, fps=30)
            log_video(writer, "eval/video", frames[:, ::4, ::4], loop.global_step, fps=30)
        progress.phase, loop.eval_step, loop.next_eval = phase, loop.global_step, loop.next_eval + args.eval_every

    def checkpoint():  # between env steps, never inside an update; the curves up to it are on disk before it is
        with deferred_signals():
            writer.flush()
            save_checkpoint(os.path.join(run_dir, CHECKPOINT), args, nets, opts, vars(loop), replay)

    obs, _ = envs.reset(seed=args.seed + loop.global_step)  # (+ the frame: a resumed run meets new episodes)
    reward, is_first, is_terminal = np.zeros(N, np.float32), np.ones(N, bool), np.zeros(N, bool)
    autoreset, state = np.zeros(N, bool), None  # envs whose next step only resets (no frames); the acting state
    prefill = args.action_repeat * max(args.prefill, N * T, B * T)  # frames of random actions (and a batch in replay)
    total = args.pretrain + (args.total_timesteps - prefill) // (args.action_repeat * args.train_every)  # if trained
    start = f"resumed at frame {loop.global_step}" if ck else f"prefilling {prefill} frames with random actions"
    progress.print(f"cost: {B * T} replayed steps per update, {1 / args.train_every:.3g} updates per policy step, about "
                   f"{total if prefill < args.total_timesteps else 0} updates in all ({args.pretrain} when the prefill "
                   f"ends); {start}, wall time projected after the first updates")
    progress.step(loop.global_step, loop.updates)  # (a resumed run's rates start from here)
    progress.set_phase("prefill", min(prefill, args.total_timesteps))
    progress.thread.start()
    start_time, start_step, start_updates, projected, code = time.time(), loop.global_step, loop.updates, False, None
    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while loop.global_step < args.total_timesteps:
            # ALGO LOGIC: random actions for `prefill` agent steps (and until the replay holds a batch), then the policy
            ready = loop.global_step >= args.prefill * args.action_repeat and replay.count >= T and len(replay) >= B * T
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
            with deferred_signals():  # the step's frames and its update credit together
                agent_steps = int((~autoreset).sum())
                loop.global_step += args.action_repeat * agent_steps
                # NEXT_STEP autoreset: the step after a done step returns the next episode's first obs
                is_first, is_terminal, autoreset = autoreset, term, term | trunc
                # ALGO LOGIC: `pretrain` updates when the prefill ends, then one update every `train_every` agent steps
                if ready:  # (credit in agent steps; the pretrain burst is pretrain x train_every of it)
                    loop.train_credit += agent_steps + (0 if loop.pretrained else args.pretrain * args.train_every)
                    loop.pretrained = True
            if "episode" in infos:
                for r, l, done in zip(infos["episode"]["r"], infos["episode"]["l"], infos["_episode"]):
                    if done:
                        loop.recent_returns = (loop.recent_returns + [float(r)])[-10:]
                        writer.add_scalar("charts/episodic_return", r, loop.global_step)
                        writer.add_scalar("charts/episodic_length", l, loop.global_step)

            if ready and progress.phase == "prefill":
                progress.set_phase("pretrain", loop.updates + loop.train_credit // args.train_every)
            while loop.train_credit >= args.train_every:
                compiling = args.compile and loop.updates == start_updates  # (this process's first update)
                if compiling:
                    progress.print("compiling the update (--compile): the first update takes minutes on a CPU (a "
                                   "Ctrl-C waits for it)")
                    t_compile = time.time()
                with deferred_signals():  # an update and its counters together
                    data = batch_to(replay.sample(B, T), device)
                    for k, v in update(wm, actor, critic, slow_critic, opts, data, args, loop.updates).items():
                        loop.metric_sums[k] = loop.metric_sums.get(k, 0.0) + v
                    loop.n_metrics, loop.updates = loop.n_metrics + 1, loop.updates + 1
                    loop.train_credit -= args.train_every
                progress.step(loop.global_step, loop.updates)  # the pretrain burst can take minutes
                if compiling:  # rates and the projection count from the compiled update on
                    progress.print(f"compiled the update in {fmt_time(time.time() - t_compile)}")
                    progress.set_phase(progress.phase, progress.end)
                if args.video_every and loop.global_step >= loop.next_video:
                    log_video(writer, "openloop", openloop_video(wm, actor, data, args.video_context), loop.global_step,
                              fps=10)
                    loop.next_video += args.video_every
            if progress.phase == "pretrain":  # the train phase's rate and the projection start after the pretrain
                progress.set_phase("train", args.total_timesteps)
            progress.step(loop.global_step, loop.updates, np.mean(loop.recent_returns or [np.nan]))
            t0, _, u0 = progress.samples[0]  # (the train phase's start, or its last 2 minutes)
            if progress.phase == "train" and not projected and loop.updates - u0 >= 10 and progress.clock() - t0 >= 20:
                projected = True  # rest of the run at the train phase's rate
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
                sps = int((loop.global_step - start_step) / (time.time() - start_time))  # (this process's frames)
                writer.add_scalar("charts/SPS", sps, loop.global_step)
                writer.add_scalar("charts/updates", loop.updates, loop.global_step)
                m = loop.last_metrics  # (the decoder's NLL, ~11,300 on 64x64, apart: it would hide the rest)
                progress.print(progress.line() + f" | kl {m.get('losses/kl', np.nan):.2f} | reward nll "
                               f"{m.get('losses/reward', np.nan):.3f} | image nll {m.get('losses/image', np.nan):.0f}")
            if loop.next_eval <= loop.global_step < args.total_timesteps:  # (the final one below)
                evaluation()
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
