"""ALM(K): Aligned Latent Models, from states.

Paper: "Simplifying Model-based RL: Learning Representations, Latent-space Models, and Policies with
One Objective", Ghugare, Bharadhwaj, Eysenbach, Levine, Salakhutdinov, ICLR 2023, arXiv:2209.08466
(the text in shared/papers/alm.txt). Official code read, never copied: RajGhugare19/alm@3b70f5b.

Map of this file (a reader who came for the paper can stop at `# --- Main`):
    Args                               every flag; Table 3's values as defaults, Fig. 5's ablations last
    # --- Small math helpers           exploration schedule, Gaussian sample and KL, log-odds, lambda-returns
    # --- Networks                     encoder, latent model, actor, reward, classifier, twin critic (App. D)
    # --- Losses and the update step   Eq. 7-11 and one ALM update (Algorithm 1), the four Adams
    # --- Acting, evaluation, pictures acting with exploration noise, evaluation episodes
    # --- Main                         run machinery: flag checks, progress line, signals, checkpoints and
                                       resume, --eval-checkpoint, the loop (collect, train, log, evaluate)

One objective, a lower bound on the return, trains the encoder e(z|s), the latent model m(z'|z,a) and
the policy pi(a|z): replayed K-step sequences train encoder and model (Eq. 7: predicted rewards along
the model rollout minus KL(m || target encoder), plus Q at the end); on-policy K-step model rollouts
train the policy (Eq. 8: predicted reward + c * classifier log-odds, lambda-weighted over lengths
1..K, bootstrapped with Q). Reward r(z,a), twin Q(z,a) and classifier C(z,a,z') learn from real
transitions only (Eq. 9-11) on latents of the target encoder. DDPG-style exploration, UTD 1.

Symbol map (paper -> code):
    s_t -> obs (B, S)           z_t -> z (B, Z)               a_t -> action (B, A), in the env's box
    e_phi -> agent.encoder      e_phi_targ -> agent.encoder_target   m_phi -> agent.model
    pi_phi -> agent.actor       r_theta -> agent.reward        Q_theta -> agent.critic (twin, min)
    Q_theta_targ -> agent.critic_target   C_theta -> agent.classifier (2 logits)
    C_theta(z_{t+1}, a_t, z_t) in Eq. 8 -> agent.classify(z_t, a_t, z_{t+1}) (same inputs, code order z, a, z')
    K -> horizon   c -> classifier_coef   lambda -> lam   gamma -> gamma   tau -> tau
Shape letters: B batch, K horizon (rollout length), S observation dim, A action dim, Z latent dim.

Replay alignment (common/replay.py): row t holds s_t, the reward received on ARRIVING at s_t and the
action a_t chosen at s_t. So transition (s_t, a_t) -> s_{t+1} has reward reward[t+1] and terminal
flag is_terminal[t+1]; a (B, K+1) window holds K transitions.

Deviations from the paper (each tagged `# DEVIATION` where it happens):
 1. No gamma^t factors inside Eq. 7 and no gamma^K on its Q term (paper footnote 2; the official code
    has neither). Eq. 8's discounts are kept.
 2. The log of rewards and of Q in the bound (Eq. 5) is omitted, so Eq. 7 and 8 use r and Q directly
    (Sec. 4 "Differences between theory and experiments", App. A.8), and c = 0.1 instead of the
    theory's 1 (Table 3).
 3. Policy objective as in the official code: lambda-returns G_t for every start t = 0..K-1 of the
    rollout, weighted gamma^t and averaged (Dreamer-style); the paper's text describes the
    lambda-weighted average from the first state only (App. D). G_0 is exactly that average.
 4. Update order of the official code (encoder+model, reward+classifier, critic, actor); Algorithm 1
    lists the policy before classifier, Q and reward.
 5. The classifier sees, per sample, either the real z' (label 1) or the model's z' (label 0), a random
    half of the batch each (official code); Eq. 9 writes both terms for every sample.
 6. The Q term of Eq. 7 is zero when s_K is terminal (the official code ignores terminals there).
 7. Evaluation clamps the actor's mean into the env's box (the official code sends the raw tanh mean).
 8. The exploration-std schedule counts steps after the warm-up (official code).
 9. gymnasium MuJoCo v5 tasks instead of gym v2 / mujoco-py; 10 evaluation episodes (CONVENTIONS).
10. One sample of z ~ e_targ(s) and z' ~ e_targ(s') is shared by the reward, classifier, critic and
    actor losses (the official code draws a fresh sample for each; same expectation).
11. Non-finite losses are recorded on the device and checked every --log-every steps (no host sync
    inside an update), not by clip_grad_norm_(error_if_nonfinite=True) at every step; the run then stops
    with one `error: non-finite ...` line naming the metric, its value, the frame and update (exit code 3).
12. Twin critics, the min of the two, and clipped-noise target actions (TD3-style, official code);
    Eq. 10 / App. C have one Q and the target Q_targ(z', pi(z')).
13. Policy rollouts and every Q bootstrap (Eq. 7, 8, 10) use noisy clipped actions clamp(pi(z) + clip(eps))
    with the scheduled std, not the mean pi(z) (official code).
14. LayerNorm also on the classifier (official code); App. D applies it to value and reward only.
15. Replayed windows never cross an episode boundary (within_episode=True): the official sample_seq only
    checks terminals, so its windows can span a time-limit reset (a fix of the official code).

Checkpoints and resume: with --checkpoint-every N (default 10_000 env steps; 0: none) runs/{run}/checkpoint.pt
is written atomically (temporary file, fsync, rename) every N env steps, at the end, and on Ctrl-C or SIGTERM
(exit 130 / 143; the state at the frame it stopped: a signal inside an update with its counters, a replay row or a
checkpoint waits for its end; a cut evaluation runs again after --resume), and the replay lives in
memory-mapped files in runs/{run}/replay/ (disk: the replay's full size, 10 MB for HalfCheetah's 1e5 steps, 1.5 GB
for Humanoid's 1e6). The checkpoint holds every network with its buffers (encoder, model, actor with the action
box, reward, classifier, twin critic, target encoder, target critic), the four Adams by group name, every counter
(the env step, which is also the position of the exploration-std schedule and of the warm-up; updates; the next
log and eval steps, the last checkpoint's; the last update's metrics and the non-finite record; recent returns;
the last evaluation; the final JSON line once the run finished), every RNG (python, numpy, torch, cuda, the
warm-up actions' generator, the evaluation env's generator, the replay's sampling generator), the replay's head
and the args. 10_000 steps: a kill loses at most 2% of the default 500_000-step run (minutes of GPU time at UTD 1)
for a checkpoint of about 40 MB at the default sizes.
    --resume RUN_DIR      continue that run in place from its checkpoint (RUN_DIR/checkpoint.pt also names it; its
                          flags become the defaults; only --total-timesteps, to grow it, and the logging, evaluation
                          and tracking flags may change); a finished run prints its final JSON line again
    --eval-checkpoint P   --eval-episodes episodes of the saved agent's mean action; one JSON line (eval_return,
                          eval_returns, global_step, checkpoint); no video (alm.py refuses --capture-video)
    --save-model          the same format, without the replay's head, in runs/{run}/{exp_name}.pt at the end
What a resume restores exactly: the learner (every parameter, buffer, optimiser moment and step, RNG, counter,
the replay's rows, head and sampling RNG) and the evaluation episodes (the eval env's generator): the next update
after a restore is the uninterrupted run's next update, bit for bit (tests/test_alm.py). What it does not: the
MuJoCo states of the training episodes in progress are not saved, so those episodes start afresh (the envs are
reset with --seed + the env step) and the env steps that follow differ from the uninterrupted run's; after a kill,
the rows written after the checkpoint stay in the replay files as common/replay.py describes. SPS and the projected
wall time count from the resume.

Run:  python alm.py --env-id HalfCheetah-v5
      python alm.py --resume runs/HalfCheetah-v5__alm__1__1700000000 --total-timesteps 1000000
      python alm.py --eval-checkpoint runs/HalfCheetah-v5__alm__1__1700000000/checkpoint.pt
"""

import contextlib
import json
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

from common.envs import GYM_MUJOCO_IDS, is_pixel, make_env, make_vector_env
from common.replay import ReplayBuffer, check_capacity

ACTION_EPS = 1e-6  # actions are clamped into [low + eps, high - eps] of the env's box (official TruncatedNormal)


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
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "mbrl-without-reconstruction"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """not supported by alm.py (gymnasium state tasks are built without a render mode)"""
    save_model: bool = False
    """if toggled, save the agent to runs/{run_name}/{exp_name}.pt at the end (read by --eval-checkpoint)"""
    checkpoint_every: int = 10_000
    """env steps between checkpoints to runs/{run_name}/checkpoint.pt (the replay then lives on disk); 0: none"""
    resume: Optional[str] = None
    """continue this run dir (or its checkpoint.pt) in place; only --total-timesteps and logging flags may change"""
    eval_checkpoint: Optional[str] = None
    """evaluate the agent in this checkpoint file for --eval-episodes episodes, print the JSON line, and stop"""
    env_id: str = "HalfCheetah-v5"
    """a gymnasium MuJoCo id (HalfCheetah-v5, Hopper-v5, Walker2d-v5, Ant-v5, Humanoid-v5, ...)"""
    total_timesteps: int = 500_000
    """environment steps in total, warm-up included (official config num_train_steps)"""
    num_envs: int = 1
    """parallel training envs (the paper uses one; one update per env step in any case)"""
    eval_every: int = 5000
    """evaluate every this many env steps (official config eval_episode_interval)"""
    eval_episodes: int = 10
    """episodes per evaluation, actor mean (CONVENTIONS; official config 5)"""
    log_every: int = 1000
    """log losses and check them for non-finite values every this many env steps"""

    # Algorithm: ALM Table 3 unless noted
    gamma: float = 0.99
    """discount gamma (Table 3)"""
    learning_starts: int = 5000
    """warm-up steps with uniform random actions and no updates (Table 3)"""
    tau: float = 0.005
    """soft update rate of the target encoder and target critic (Table 3)"""
    lam: float = 0.95
    """lambda of the weighted average over rollout lengths 1..K (Table 3)"""
    buffer_size: Optional[int] = None
    """replay capacity (Table 3: 1e6 for Humanoid, 1e5 otherwise); None picks by --env-id"""
    batch_size: int = 512
    """batch size of both update phases (Table 3)"""
    learning_rate: float = 1e-4
    """Adam learning rate of every network (Table 3)"""
    max_grad_norm: float = 100.0
    """gradient norm clip of every network (Table 3)"""
    latent_dim: int = 50
    """latent dimension Z (Table 3)"""
    classifier_coef: float = 0.1
    """coefficient c of the classifier reward in Eq. 8 (Table 3)"""
    expl_clip: float = 0.3
    """exploration noise clip inside updates (Table 3, "exploration stddev. clip")"""
    expl_start: float = 1.0
    """exploration std at the end of warm-up (Table 3, linear(1.0, 0.1, 100000))"""
    expl_end: float = 0.1
    """final exploration std (Table 3)"""
    expl_duration: int = 100_000
    """steps of the linear exploration-std schedule (Table 3)"""
    hidden_dim: int = 512
    """hidden units of encoder, policy, reward, classifier and Q networks (App. D)"""
    model_hidden_dim: int = 1024
    """hidden units of the latent model (App. D)"""

    # Ablations of Fig. 5 (defaults = paper)
    horizon: int = 3
    """K: model rollout length, ALM(K) (Fig. 5 center; ALM(3) is the paper's default)"""
    kl_term: bool = True
    """the KL term of the encoder/model objective (--no-kl-term: Fig. 5 left, "no KL term for the encoder")"""
    value_term: bool = True
    """the Q term of the encoder/model objective (--no-value-term: Fig. 5 left, "no value term for the encoder")"""
    classifier_reward: bool = True
    """the classifier reward of the policy objective (--no-classifier-reward: Fig. 5 left, "no classifier reward")"""


def replay_capacity(args: Args) -> int:
    """[ALM Table 3] replay buffer 1e6 for Humanoid (plain and truncated), 1e5 otherwise, unless --buffer-size."""
    if args.buffer_size is not None:
        return args.buffer_size
    return 1_000_000 if "Humanoid" in args.env_id else 100_000


# --- Small math helpers ----------------------------------------------------------------------
def linear_schedule(start: float, end: float, duration: int, step: int) -> float:
    """[Table 3] linear(start, end, duration): start at step 0, end from step `duration` on."""
    return end + (1.0 - min(step / duration, 1.0)) * (start - end)


def sample(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Reparameterised sample of a diagonal Gaussian."""
    return mean + std * torch.randn_like(mean)


def gaussian_kl(mean1, std1, mean2, std2) -> torch.Tensor:
    """KL(N(mean1, std1^2) || N(mean2, std2^2)) of diagonal Gaussians, summed over the last axis."""
    return (torch.log(std2 / std1) + (std1**2 + (mean1 - mean2) ** 2) / (2 * std2**2) - 0.5).sum(-1)


def log_odds(logits: torch.Tensor) -> torch.Tensor:
    """[ALM Sec. 4] log C/(1-C), C = softmax(logits)[..., 1] = P(z' came from the encoder): logit difference."""
    return logits[..., 1] - logits[..., 0]


def lambda_returns(reward: torch.Tensor, q: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """reward (B, K), q (B, K+1) -> G (B, K), the lambda-weighted average over rollout lengths:
    G_t = r_t + gamma * ((1 - lam) * q_{t+1} + lam * G_{t+1}), G_K = q_K
    so G_0 = (1-lam) sum_{k<K} lam^(k-1) G^k + lam^(K-1) G^K with G^k = sum_{i<k} gamma^i r_i + gamma^k q_k."""
    last, out = q[:, -1], []
    for t in reversed(range(reward.shape[1])):
        last = reward[:, t] + gamma * ((1 - lam) * q[:, t + 1] + lam * last)
        out.append(last)
    return torch.stack(out[::-1], 1)


def policy_objective(reward: torch.Tensor, q: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """[ALM Eq. 8, App. D] mean over batch and start step t of gamma^t * G_t (the quantity to maximise).
    # DEVIATION: paper describes G_0 only; the official code averages gamma^t G_t over t = 0..K-1."""
    G = lambda_returns(reward, q, gamma, lam)  # (B, K)
    discount = gamma ** torch.arange(G.shape[1], device=G.device, dtype=G.dtype)
    return (discount * G).mean()


def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """theta_targ <- (1 - tau) theta_targ + tau theta (Table 3, every update)."""
    with torch.no_grad():
        for tp, p in zip(target.parameters(), source.parameters()):
            tp.lerp_(p, tau)


# --- Networks --------------------------------------------------------------------------------
def mlp(inp: int, hidden: int, out: int, layer_norm: bool = False) -> nn.Sequential:
    """2 hidden layers, ELU (App. D, App. G). layer_norm: first layer Linear-LayerNorm-Tanh (App. D applies
    LayerNorm to the value function and rewards; the official code also to the classifier)."""
    first = [nn.LayerNorm(hidden), nn.Tanh()] if layer_norm else [nn.ELU()]
    net = nn.Sequential(nn.Linear(inp, hidden), *first, nn.Linear(hidden, hidden), nn.ELU(), nn.Linear(hidden, out))
    for m in net:
        if isinstance(m, nn.Linear):  # orthogonal weights, zero bias (official code)
            nn.init.orthogonal_(m.weight)
            nn.init.zeros_(m.bias)
    return net


class Gaussian(nn.Module):
    """Diagonal Gaussian over the latent: the encoder e(z|s) and the latent model m(z'|z,a) (App. D)."""

    def __init__(self, inp: int, hidden: int, latent: int):
        super().__init__()
        self.net = mlp(inp, hidden, 2 * latent)

    def forward(self, *x: torch.Tensor):
        mean, raw = self.net(torch.cat(x, -1)).chunk(2, -1)
        mean = 30 * torch.tanh(mean / 30)  # soft bound of the mean (official code)
        std = 10 - F.softplus(10 - raw)  # std softly clamped into [0.1, 10] (official code)
        return mean, 0.1 + F.softplus(std - 0.1)


class Actor(nn.Module):
    """Deterministic policy mean tanh(f(z)) plus scheduled Gaussian noise (DDPG-style, App. D); actions live
    in the env's own box [low, high] (default [-1, 1])."""

    def __init__(self, latent: int, hidden: int, action_dim: int, low=-1.0, high=1.0):
        super().__init__()
        self.net = mlp(latent, hidden, action_dim)
        self.register_buffer("low", torch.as_tensor(low, dtype=torch.float32).expand(action_dim).clone())
        self.register_buffer("high", torch.as_tensor(high, dtype=torch.float32).expand(action_dim).clone())

    def forward(self, z: torch.Tensor, std: float, clip: Optional[float] = None):
        """Returns (mean, sample); the noise is clipped to +-clip when given; the sample is clamped into the
        env's box with a straight-through gradient. [official code] TruncatedNormal(low, high): the tanh mean
        and the noise are in env units and the clamped sample goes to the env as is (no rescaling), so the
        noise std and clip of Table 3 are absolute, e.g. on Humanoid's +-0.4 box."""
        mean = torch.tanh(self.net(z))
        noise = torch.randn_like(mean) * std
        if clip is not None:
            noise = noise.clamp(-clip, clip)
        a = mean + noise
        return mean, a - a.detach() + a.detach().clamp(self.low + ACTION_EPS, self.high - ACTION_EPS)


class Critic(nn.Module):
    """Twin Q(z, a) with LayerNorm (App. D). # DEVIATION: Eq. 10 / App. C have one Q; we use two and their min
    (TD3-style) because the official code, which produced the paper's numbers, does."""

    def __init__(self, latent: int, hidden: int, action_dim: int):
        super().__init__()
        self.q1, self.q2 = mlp(latent + action_dim, hidden, 1, True), mlp(latent + action_dim, hidden, 1, True)

    def forward(self, z, a):
        x = torch.cat([z, a], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


class Agent(nn.Module):
    """All of ALM's networks (Table 4) and the two target copies."""

    def __init__(self, obs_dim: int, action_dim: int, latent: int, hidden: int, model_hidden: int,
                 action_low=-1.0, action_high=1.0):
        super().__init__()
        self.encoder = Gaussian(obs_dim, hidden, latent)
        self.encoder_target = Gaussian(obs_dim, hidden, latent)
        self.model = Gaussian(latent + action_dim, model_hidden, latent)
        self.actor = Actor(latent, hidden, action_dim, action_low, action_high)
        self.reward = mlp(latent + action_dim, hidden, 1, layer_norm=True)
        # DEVIATION: App. D puts LayerNorm on value and reward only; the official code also on the classifier
        self.classifier = mlp(2 * latent + action_dim, hidden, 2, layer_norm=True)
        self.critic = Critic(latent, hidden, action_dim)
        self.critic_target = Critic(latent, hidden, action_dim)
        self.encoder_target.load_state_dict(self.encoder.state_dict())
        self.critic_target.load_state_dict(self.critic.state_dict())
        for p in [*self.encoder_target.parameters(), *self.critic_target.parameters()]:
            p.requires_grad_(False)

    def predict_reward(self, z, a):
        return self.reward(torch.cat([z, a], -1)).squeeze(-1)

    def classify(self, z, a, z_next):
        return self.classifier(torch.cat([z, a, z_next], -1))


# --- Losses and the update step --------------------------------------------------------------
def split_transitions(batch: dict):
    """(B, 2) windows -> s_t, a_t, r, s_{t+1}, terminal. The reward and terminal flag of the transition
    (s_t, a_t) -> s_{t+1} are stored on the row of s_{t+1}: reward[:, 1], is_terminal[:, 1]."""
    obs, action = batch["obs"], batch["action"]
    return obs[:, 0], action[:, 0], batch["reward"][:, 1], obs[:, 1], batch["is_terminal"][:, 1].float()


def representation_loss(agent: Agent, obs, action, is_terminal, std: float, clip: float,
                        kl_term: bool = True, value_term: bool = True):
    """[ALM Eq. 7] on replayed windows obs (B, K+1, S), action (B, K+1, A), is_terminal (B, K+1).
    Gradients are meant for encoder and model only (the caller differentiates w.r.t. their parameters).
        z_0 ~ e(s_0);  z_{t+1} ~ m(z_t, a_t) with the replayed a_t
        maximise  sum_t [ r(z_t, a_t) - KL(m(.|z_t, a_t) || e_targ(.|s_{t+1})) ] + Q(z_K, pi(z_K))
    # DEVIATION: no gamma^t factors, no gamma^K on Q, and no log of r and Q (the log is in Eq. 5; paper
    footnote 2, Sec. 4, App. A.8, official code)."""
    # row t:      0          1          2          3 = K
    # obs:        s_0 -> e   s_1 -> KL  s_2 -> KL  s_3 -> KL target (e_targ)
    # action:     a_0        a_1        a_2        (not used: Q(z_K, pi(z_K)) picks its own action)
    # latent:     z_0 ~ e    z_1 ~ m    z_2 ~ m    z_3 ~ m
    K = obs.shape[1] - 1
    z = sample(*agent.encoder(obs[:, 0]))  # (B, Z)
    with torch.no_grad():
        target_mean, target_std = agent.encoder_target(obs[:, 1:])  # (B, K, Z) each
    kl, reward = [], []
    for t in range(K):
        mean, std_m = agent.model(z, action[:, t])
        kl.append(gaussian_kl(mean, std_m, target_mean[:, t], target_std[:, t]))  # (B,)
        reward.append(agent.predict_reward(z, action[:, t]))  # (B,)
        z = sample(mean, std_m)  # the model's sample, not the encoder's
    kl, reward = torch.stack(kl, 1), torch.stack(reward, 1)  # (B, K)
    with torch.no_grad():  # DEVIATION: paper says pi(z_K); a noisy clipped sample as the official code
        _, a_K = agent.actor(z, std, clip)
    q = torch.min(*agent.critic(z, a_K))  # (B,)
    q = q * (1 - is_terminal[:, K].float())  # DEVIATION: a terminal s_K has no future return
    objective = reward.sum(1)
    if kl_term:  # ABLATION(kl_term): Fig. 5 "no KL term for the encoder" drops the KL from Eq. 7
        objective = objective - kl.sum(1)
    if value_term:  # ABLATION(value_term): Fig. 5 "no value term for the encoder" drops Q from Eq. 7
        objective = objective + q
    loss = -objective.mean()
    return loss, {"losses/alm": loss, "losses/kl": kl.mean(), "stats/alm_reward": reward.mean(), "stats/alm_q": q.mean()}


def reward_classifier_loss(agent: Agent, z, a, r, z_next, z_model):
    """[ALM Eq. 11] (r(z,a) - r)^2 and [Eq. 9] cross-entropy of C(z, a, z'): label 1 for z' ~ e_targ(s'),
    label 0 for z' ~ m(z, a). # DEVIATION: a random half of the batch gets the model's z' (official code)."""
    B = z.shape[0]
    fake = torch.zeros(B, dtype=torch.bool, device=z.device)
    fake[torch.randperm(B, device=z.device)[: B // 2]] = True
    logits = agent.classify(z, a, torch.where(fake[:, None], z_model, z_next))  # (B, 2)
    classifier_loss = F.cross_entropy(logits, (~fake).long())
    reward_loss = F.mse_loss(agent.predict_reward(z, a), r)
    return reward_loss + classifier_loss, {"losses/reward": reward_loss, "losses/classifier": classifier_loss}


def critic_loss(agent: Agent, z, a, r, z_next, terminal, std: float, clip: float, gamma: float):
    """[ALM Eq. 10] TD loss on real transitions, real rewards only, target critic.
    # DEVIATION: paper says r + gamma Q_targ(z', pi(z')); we use min of twin Q_targ at a' = pi(z') + clipped
    noise (target smoothing) and (1 - terminal), as the official code."""
    with torch.no_grad():
        _, a_next = agent.actor(z_next, std, clip)
        target = r + gamma * (1 - terminal) * torch.min(*agent.critic_target(z_next, a_next))  # (B,)
    q1, q2 = agent.critic(z, a)
    loss = (F.mse_loss(q1, target) + F.mse_loss(q2, target)) / 2
    return loss, {"losses/critic": loss, "stats/q": q1.mean()}


def policy_loss(agent: Agent, z, std: float, clip: float, gamma: float, lam: float, horizon: int,
                classifier_coef: float, classifier_reward: bool = True):
    """[ALM Eq. 8] on an on-policy K-step model rollout from z ~ e_targ(s) (B, Z). Gradients are meant for
    the actor only; they flow through the model's reparameterised samples (SVG). As in the official code
    the actor reads sg(z), and Q(z_t, sg(a_t)) passes gradient through z_t only.
        r~_t = r(z_t, a_t) + c * log C(z_{t+1}, a_t, z_t) / (1 - C(...)),  bootstrap Q(z_K, pi(z_K))"""
    # DEVIATION: paper says a_t = pi(z_t); the rollout and the Q bootstrap use noisy clipped samples with the
    # scheduled std (official code)
    zs, actions = [z], []
    for _ in range(horizon):
        _, a = agent.actor(zs[-1].detach(), std, clip)
        actions.append(a)
        zs.append(sample(*agent.model(zs[-1], a)))
    actions.append(agent.actor(zs[-1].detach(), std, clip)[1])
    z_seq, a_seq = torch.stack(zs, 1), torch.stack(actions, 1)  # (B, K+1, Z), (B, K+1, A)
    reward = agent.predict_reward(z_seq[:, :-1], a_seq[:, :-1])  # (B, K)
    metrics = {"stats/imag_reward": reward.mean()}
    if classifier_reward:  # ABLATION(classifier_reward): Fig. 5 "no classifier reward" drops c * log-odds
        bonus = log_odds(agent.classify(z_seq[:, :-1], a_seq[:, :-1], z_seq[:, 1:].detach()))  # (B, K)
        # DEVIATION: c = 0.1, not the theory's 1 (Table 3, Sec. 4)
        reward = reward + classifier_coef * bonus
        metrics["stats/classifier_reward"] = bonus.mean()
    q = torch.min(*agent.critic(z_seq, a_seq.detach()))  # (B, K+1); q[:, 0] is unused (one batched call)
    loss = -policy_objective(reward, q, gamma, lam)
    return loss, {"losses/actor": loss, **metrics}


def optimize(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list, max_norm: float) -> torch.Tensor:
    """Gradient of `loss` w.r.t. `params` only (the other networks stay frozen), clip, Adam step."""
    for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)):
        p.grad = g
    norm = nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    return norm


def update(agent: Agent, optims: dict, groups: dict, seq: dict, batch: dict, std: float, args: Args) -> dict:
    """One ALM update (Algorithm 1 lines 6-11) on a (B, K+1) window batch `seq` and a (B, 2) batch `batch`.
    # DEVIATION: official order (encoder+model, reward+classifier, critic, actor), then the soft updates."""
    loss, metrics = representation_loss(agent, seq["obs"], seq["action"], seq["is_terminal"], std, args.expl_clip,
                                        args.kl_term, args.value_term)
    metrics["grad_norm/model"] = optimize(optims["model"], loss, groups["model"], args.max_grad_norm)
    obs, a, r, next_obs, terminal = split_transitions(batch)
    # [App. D] reward, classifier, Q and policy use latents of the target encoder.
    # DEVIATION: the official code draws a fresh z ~ e_targ(s) for each loss; we share one sample (same
    # expectation, fewer encoder passes)
    with torch.no_grad():
        z, z_next = sample(*agent.encoder_target(obs)), sample(*agent.encoder_target(next_obs))
        z_model = sample(*agent.model(z, a))
    loss, m = reward_classifier_loss(agent, z, a, r, z_next, z_model)
    metrics.update(m, **{"grad_norm/reward": optimize(optims["reward"], loss, groups["reward"], args.max_grad_norm)})
    loss, m = critic_loss(agent, z, a, r, z_next, terminal, std, args.expl_clip, args.gamma)
    metrics.update(m, **{"grad_norm/critic": optimize(optims["critic"], loss, groups["critic"], args.max_grad_norm)})
    loss, m = policy_loss(agent, z, std, args.expl_clip, args.gamma, args.lam, seq["obs"].shape[1] - 1,
                          args.classifier_coef, args.classifier_reward)
    metrics.update(m, **{"grad_norm/actor": optimize(optims["actor"], loss, groups["actor"], args.max_grad_norm)})
    soft_update(agent.encoder_target, agent.encoder, args.tau)
    soft_update(agent.critic_target, agent.critic, args.tau)
    return {k: v.detach() for k, v in metrics.items()}


def make_optimizers(agent: Agent, lr: float):
    """Four Adams as in the official code: encoder+model, reward+classifier, critic, actor (lr Table 3)."""
    groups = dict(model=[*agent.encoder.parameters(), *agent.model.parameters()],
                  reward=[*agent.reward.parameters(), *agent.classifier.parameters()],
                  critic=list(agent.critic.parameters()), actor=list(agent.actor.parameters()))
    return {k: torch.optim.Adam(v, lr=lr) for k, v in groups.items()}, groups


# --- Acting, evaluation, pictures ------------------------------------------------------------
@torch.no_grad()
def act(agent: Agent, obs: torch.Tensor, std: float, deterministic: bool) -> torch.Tensor:
    """[Algorithm 1 line 3] a ~ pi(.|z), z ~ e(s) from the online encoder; unclipped noise; the mean at eval.
    # DEVIATION: the eval mean is clamped into the box (official code sends the raw tanh mean, which MuJoCo
    clamps anyway but Humanoid's control cost would see unclamped)."""
    mean, a = agent.actor(sample(*agent.encoder(obs)), std)
    return torch.max(torch.min(mean, agent.actor.high), agent.actor.low) if deterministic else a


def evaluate(agent: Agent, env, episodes: int, device: torch.device) -> list:
    """Returns of `episodes` episodes with the actor's mean on the evaluation env."""
    returns = []
    for _ in range(episodes):
        obs, _ = env.reset()
        while True:
            a = act(agent, torch.as_tensor(obs, dtype=torch.float32, device=device)[None], 0.0, True)
            obs, _, term, trunc, info = env.step(a[0].cpu().numpy())
            if term or trunc:
                returns.append(float(info["episode"]["r"]))
                break
    return returns


# --- Main ---------------------------------------------------------------------------------------
SCRIPT, CHECKPOINT = os.path.basename(__file__), "checkpoint.pt"
RESUMABLE = ("total_timesteps", "resume", "eval_checkpoint", "save_model", "checkpoint_every", "track", "cuda",
             "wandb_project_name", "wandb_entity", "capture_video", "eval_every", "eval_episodes", "log_every")
CHECKS = [  # (flag, bad(value, args), message after "--flag ", formatted with the value v and check_args' names)
    ("seed", lambda v, a: v < 0, "must be >= 0, got {v}"),
    *[(f, lambda v, a: v < 1, "must be >= 1, got {v}") for f in "total_timesteps num_envs eval_every eval_episodes "
      "log_every batch_size latent_dim expl_duration hidden_dim model_hidden_dim horizon".split()],
    *[(f, lambda v, a: not v > 0, "must be > 0, got {v}") for f in ("learning_rate", "max_grad_norm")],
    *[(f, lambda v, a: not 0 <= v <= 1, "must lie in [0, 1], got {v}") for f in ("gamma", "tau", "lam")],
    *[(f, lambda v, a: not v >= 0, "must be >= 0, got {v}") for f in "learning_starts classifier_coef expl_clip "
      "expl_start expl_end".split()],
    ("total_timesteps", lambda v, a: v <= a.learning_starts, "{v} must be larger than the warm-up, --learning-starts "
     "{a.learning_starts} (random actions, no updates): nothing would be trained"),
    ("checkpoint_every", lambda v, a: v < 0, "must be >= 0 (0: no checkpoints), got {v}"),
    ("resume", lambda v, a: v and a.eval_checkpoint, "and --eval-checkpoint exclude each other"),
    ("resume", lambda v, a: v and not os.path.isdir(v), "{v}: no such run directory (give the run's folder, e.g. "
     "runs/NAME)"),
    ("capture_video", lambda v, a: v, "is not supported by {script}: common.envs.make_env builds gymnasium state "
     "tasks without a render mode"),
    ("buffer_size", lambda v, a: replay_capacity(a) < a.batch_size * (a.horizon + 1), "must hold one batch of "
     "windows (--batch-size x (--horizon + 1) = {batch} steps), {got}"),  # an update samples (B, K+1) windows
    ("buffer_size", lambda v, a: replay_capacity(a) // a.num_envs < a.horizon + 1, "must hold a window of --horizon "
     "+ 1 = {win} steps in each of the --num-envs {a.num_envs} streams ({streams} steps), {got}"),
    ("env_id", lambda v, a: is_pixel(v), "{v}: {script} learns from state vectors with continuous actions; use a "
     "gymnasium MuJoCo id: {ids}"),  # (DMC and MiniGrid ids are pixel tasks; is_pixel refuses an unknown id)
]


def fail(msg):  # bad input: one line `error: ...` on stderr and exit code 2 (a command-line error), no traceback
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def check_args(args: Args) -> None:
    """The CHECKS table in order, then the replay's size (on disk with checkpoints), before anything is built."""
    win, cap = args.horizon + 1, replay_capacity(args)
    got = f"got {cap}" + " (the default for this --env-id)" * (args.buffer_size is None)
    names = dict(a=args, win=win, batch=args.batch_size * win, streams=args.num_envs * win, script=SCRIPT, got=got,
                 ids=", ".join(GYM_MUJOCO_IDS))
    try:
        for flag, bad, msg in CHECKS:
            if bad(getattr(args, flag), args):
                fail(f"--{flag.replace('_', '-')} " + msg.format(v=getattr(args, flag), **names))
        if not args.eval_checkpoint:  # the state size is unknown before the env is: 1 dim, a lower bound
            check_capacity(cap, args.num_envs, (1,), 1, np.float32, resume=bool(args.resume), path=os.path.join(
                args.resume or "runs", "replay") if args.checkpoint_every or args.resume else None)
    except (ValueError, MemoryError) as e:  # an unknown --env-id, a replay that cannot fit
        fail(e)


def track_non_finite(metrics: dict, first: Optional[torch.Tensor], update_index: int) -> torch.Tensor:
    """(2, M) float64: per metric the first update where it was non-finite (-1: none yet), its value; no host sync."""
    values = torch.stack(list(metrics.values())).double()  # (M,)
    first = torch.full((2, len(values)), -1.0, dtype=torch.float64, device=values.device) if first is None else first
    new = ~torch.isfinite(values) & (first[0] < 0)
    return torch.stack([torch.where(new, update_index, first[0]), torch.where(new, values, first[1])])


def non_finite_message(names: list, first: Optional[torch.Tensor], step: int) -> Optional[str]:
    """The first non-finite metric (earliest update, then computation order) logged at frame `step`, or None."""
    bad = [(u, i, v) for i, (u, v) in enumerate(zip(*first.tolist())) if u >= 0] if first is not None else []
    if bad:
        u, i, v = min(bad)  # NaN spreads: later metrics and later updates are consequences
        return f"non-finite {names[i]} = {v} in the updates logged at frame {step} (update {int(u)})"


def fmt_time(s):  # 12 s, 3.4 min, 5.6 h, or ? when unknown
    return "?" if not np.isfinite(s) else f"{s:.0f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else \
        f"{s / 3600:.1f} h"


class Progress:
    """The status line, at every log step and from a heartbeat whenever nothing was printed for 30 s (in place on a
    terminal, plain lines elsewhere); rates and ETA from the current phase's last `window_s` seconds."""

    def __init__(self, total, window_s=120.0, clock=time.monotonic, out=sys.stdout):
        self.total, self.window_s, self.clock, self.out, self.tty = total, window_s, clock, out, out.isatty()
        self.frames, self.updates, self.recent, self.eval = 0, 0, float("nan"), float("nan")
        self.stop, self.last_print = threading.Event(), clock()
        self.set_phase("setup", 0)

    def set_phase(self, phase, end):  # `phase` lasts until frame `end`; its rates are measured afresh
        self.phase, self.phase_end, self.samples = phase, end, deque([(self.clock(), self.frames, self.updates)])

    def step(self, frames, updates, recent=None, eval_return=None):  # every env step; a rate sample once a second
        self.frames, self.updates, now = frames, updates, self.clock()
        self.recent = self.recent if recent is None else recent
        self.eval = self.eval if eval_return is None else eval_return
        if now - self.samples[-1][0] >= 1.0:
            self.samples.append((now, frames, updates))
            while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
                self.samples.popleft()

    def rates(self):  # (frames/s, updates/s) of the current phase over its recent window
        t0, f0, u0 = self.samples[0]
        dt = self.clock() - t0
        return ((self.frames - f0) / dt, (self.updates - u0) / dt) if dt > 0 else (float("nan"), float("nan"))

    def eta(self):  # seconds until the current phase ends
        fps = self.rates()[0]
        return (self.phase_end - self.frames) / fps if fps > 0 else float("nan")

    def line(self):
        (fps, ups), eta = self.rates(), fmt_time(self.eta())
        return (f"[{self.phase}] frames {self.frames}/{self.total} | updates {self.updates} ({ups:.2f}/s) | "
                f"{fps:.1f} frames/s | return {self.recent:.1f} | eval {self.eval:.1f} | "
                + ("warmup ends in " if self.phase == "warmup" else "ETA ") + eta)

    def print(self, text=None, live=False):  # `live` lines are rewritten in place on a terminal
        end = "" if live and self.tty else "\n"
        self.out.write(("\r\033[K" if self.tty else "") + (text or self.line()) + end)
        self.out.flush()
        self.last_print = self.clock()

    def heartbeat(self):  # (a daemon thread's loop, until close)
        while not self.stop.wait(1.0):
            if self.clock() - self.last_print >= 30:
                self.print(live=True)

    def close(self):
        self.stop.set()
        self.out.write("\n" if self.tty else "")


SIGNALS = {"defer": 0, "pending": None}  # deferred_signals' state


def on_signal(signum, frame):  # SIGINT, SIGTERM: KeyboardInterrupt now, or at the end of a deferred_signals section
    if not SIGNALS["defer"]:
        raise KeyboardInterrupt(signal.Signals(signum).name)
    SIGNALS["pending"] = SIGNALS["pending"] or signal.Signals(signum).name


@contextlib.contextmanager
def deferred_signals():
    """A section a signal must not cut (an update with its counters, a replay row, a checkpoint) runs to its end."""
    SIGNALS["defer"] += 1
    try:
        yield
    finally:
        SIGNALS["defer"] -= 1
    if not SIGNALS["defer"] and SIGNALS["pending"]:
        name, SIGNALS["pending"] = SIGNALS["pending"], None
        raise KeyboardInterrupt(name)


def close_envs(*envs, kill=False):
    """Close envs quietly; `kill` (after a signal, which may cut a step between its messages) ends the workers."""
    for env in envs:
        for process in getattr(env, "processes", []) if kill else []:
            process.kill(), process.join()
            env.closed = True  # nothing left to close, also not at exit
        try:
            with warnings.catch_warnings():  # (gymnasium's warning about a pending step: it is finished here)
                warnings.simplefilter("ignore")
                env.close()
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            pass


def save_checkpoint(path, args, nets, opts, loop, replay=None, gens=None):
    """Everything needed to continue the run as one dict, written atomically (a temporary file, fsynced, renamed);
    `gens`: numpy generators by name (the warm-up's, the evaluation env's), saved beside every global RNG."""
    with deferred_signals():
        if replay is not None:
            replay.flush()
        kind, key, *rest = np.random.get_state()
        ck = {"script": SCRIPT, "args": asdict(args), "loop": loop,
              "nets": {k: n.state_dict() for k, n in nets.items()},
              "opts": {k: o.state_dict() for k, o in opts.items()},  # by group name: model, reward, critic, actor
              "replay": replay.state_dict() if replay is not None else None,
              "rng": {"python": random.getstate(), "numpy": (kind, key.tolist(), *rest), "torch": torch.get_rng_state(),
                      "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                      **{k: g.bit_generator.state for k, g in (gens or {}).items() if g is not None}}}
        with open(path + ".tmp", "wb") as f:
            torch.save(ck, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)  # the previous checkpoint stays whole until this one is
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(fd), os.close(fd)  # the rename itself survives a power cut


def load_checkpoint(path, flag, args):
    """The checkpoint at `path`, or one error naming `flag` and the file or a flag that would change its model."""
    if not os.path.isfile(path):
        fail(f"{flag}: no checkpoint {path}" + (" (was the run started with --checkpoint-every 0?)"
                                                 if flag == "--resume" else ""))
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated (EOFError, RuntimeError), or not a checkpoint at all (UnpicklingError)
        fail(f"{flag}: {path} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not isinstance(ck, dict) or ck.get("script") != SCRIPT:
        fail(f"{flag}: {path} is a checkpoint of {ck.get('script') if isinstance(ck, dict) else 'nothing known'}, "
             f"not of {SCRIPT}")
    saved, step, free = ck["args"], ck["loop"]["global_step"], RESUMABLE + ("seed", "num_envs") * (flag != "--resume")
    for name, value in asdict(args).items():
        if name not in free and name in saved and saved[name] != value:
            fail(f"--{name.replace('_', '-')} {value} differs from the checkpoint's {saved[name]} ({flag}); "
                 f"a saved run keeps its model, environment and schedule")
    if flag == "--resume" and args.total_timesteps <= step and not (
            ck["loop"]["summary"] or args.total_timesteps == saved["total_timesteps"]):  # (a cut final evaluation)
        fail(f"--total-timesteps {args.total_timesteps}: the run is already at frame {step}; pass a larger "
             f"--total-timesteps to continue it")
    return ck


def restore_checkpoint(ck, nets, opts, replay=None, gens=None):
    """Put save_checkpoint's dict back (the global RNGs last: nothing drawn here shifts them); returns the loop."""
    for k, m in [*nets.items(), *opts.items()]:
        m.load_state_dict(ck["nets" if k in nets else "opts"][k])
    if replay is not None:
        replay.load_state_dict(ck["replay"])
    for k, g in (gens or {}).items():
        if g is not None:
            g.bit_generator.state = ck["rng"][k]
    random.setstate(ck["rng"]["python"])
    np.random.set_state(tuple(ck["rng"]["numpy"]))
    torch.set_rng_state(ck["rng"]["torch"])
    if ck["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
    return ck["loop"]


def saved_defaults(argv):
    """With --resume or --eval-checkpoint, the saved run's flags as the defaults (None if unreadable: main says why)."""
    for flag, value in [*zip(argv, argv[1:]), *(a.split("=", 1) for a in argv if "=" in a)]:
        if flag in ("--resume", "--eval-checkpoint"):
            try:
                ck = torch.load(value if os.path.isfile(value) else os.path.join(value, CHECKPOINT),
                                map_location="cpu", weights_only=True)
                return Args(**{k: v for k, v in ck["args"].items() if k in Args.__dataclass_fields__ and k not in
                               ("resume", "eval_checkpoint")}) if ck["script"] == SCRIPT else None
            except Exception:
                return None


def build_agent(args: Args, obs_dim: int, action_dim: int, low, high, device):  # networks by name, Adams, groups
    agent = Agent(obs_dim, action_dim, args.latent_dim, args.hidden_dim, args.model_hidden_dim, low, high).to(device)
    return {"agent": agent}, *make_optimizers(agent, args.learning_rate)


def evaluate_checkpoint(args, device):
    """--eval-checkpoint: the saved agent's mean action on --eval-episodes fresh episodes; prints the JSON line."""
    path, ck = args.eval_checkpoint, load_checkpoint(args.eval_checkpoint, "--eval-checkpoint", args)
    try:
        env = make_env(args.env_id, args.seed + 10_000)
    except (ValueError, TypeError) as e:
        fail(e)
    torch.manual_seed(args.seed)
    space, step = env.action_space, ck["loop"]["global_step"]
    nets, _, _ = build_agent(args, env.observation_space.shape[0], space.shape[0], space.low, space.high, device)
    nets["agent"].load_state_dict(ck["nets"]["agent"])
    print(f"{SCRIPT}: evaluating {path} (frame {step}) on {args.env_id} for {args.eval_episodes} episodes ...",
          flush=True)
    returns = evaluate(nets["agent"], env, args.eval_episodes, device)
    env.close()
    summary = {"eval_return": float(np.mean(returns)), "eval_returns": returns, "global_step": step, "checkpoint": path}
    print(json.dumps(summary))
    return summary


def main(args: Args) -> dict:
    # Setup: the flags, a saved run, envs, replay, writer, agent, the loop's state (restored as a whole on resume)
    if args.resume and os.path.isfile(args.resume):  # --resume RUN/checkpoint.pt names RUN
        args.resume = os.path.dirname(args.resume) or "."
    check_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.eval_checkpoint:
        return evaluate_checkpoint(args, device)
    ck = load_checkpoint(os.path.join(args.resume, CHECKPOINT), "--resume", args) if args.resume else None
    if ck and ck["loop"]["summary"] and args.total_timesteps <= ck["loop"]["global_step"]:  # a finished run
        summary = {**ck["loop"]["summary"], "run_dir": args.resume}
        print(f"{args.resume} finished at frame {ck['loop']['global_step']}; its final JSON line (a larger "
              f"--total-timesteps continues it):\n{json.dumps(summary)}", flush=True)
        return summary
    progress = Progress(args.total_timesteps)
    progress.print(f"{SCRIPT}: {args.env_id}, {args.total_timesteps} env steps; building {args.num_envs} + 1 envs "
                   f"(training + evaluation) ...")
    run_dir = args.resume or os.path.join("runs", f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}")
    try:
        envs = make_vector_env(args.env_id, args.num_envs, args.seed)
        eval_env = make_env(args.env_id, args.seed + 10_000)
    except (ValueError, TypeError) as e:
        fail(e)
    obs_dim, space = envs.single_observation_space.shape[0], envs.single_action_space
    try:  # with checkpoints the replay lives in memory-mapped files in the run dir (a refused one creates nothing)
        replay = ReplayBuffer(replay_capacity(args), args.num_envs, (obs_dim,), space.shape[0], obs_dtype=np.float32,
                              seed=args.seed, path=os.path.join(run_dir, "replay") if args.checkpoint_every or ck
                              else None, resume=ck is not None)
    except (MemoryError, ValueError) as e:
        close_envs(envs, eval_env)
        fail(e)
    if args.track:
        import wandb  # only when asked; syncs the TensorBoard scalars and text below

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=os.path.basename(os.path.normpath(run_dir)), save_code=True)
    # On resume, TensorBoard drops the points logged after the checkpoint's frame S (those at S were flushed first)
    writer = SummaryWriter(run_dir, purge_step=ck["loop"]["global_step"] + 1 if ck else None)
    if ck is None:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in
                                                                                 asdict(args).items()))
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(asdict(args), f, indent=1)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    nets, optims, groups = build_agent(args, obs_dim, space.shape[0], space.low, space.high, device)
    agent, B, N = nets["agent"], args.batch_size, args.num_envs
    K = args.horizon  # ABLATION(horizon): ALM(K), Fig. 5 center; sets the replayed window and rollout length
    rng = np.random.default_rng(args.seed)  # the warm-up's uniform actions
    gens = {"warmup": rng, "eval": getattr(eval_env, "np_random", None)}  # (eval episodes continue)
    loop = SimpleNamespace(global_step=0, updates=0, next_log=args.log_every, next_eval=args.eval_every, metrics={},
                           first_bad=None, recent_returns=[], last_eval=float("nan"), summary=None, saved=None)
    if ck:  # networks, optimisers, the loop's state, every RNG, the replay's head
        loop = SimpleNamespace(**restore_checkpoint(ck, nets, optims, replay, gens))
        loop.first_bad = loop.first_bad.to(device) if loop.first_bad is not None else None
        progress.print(f"resumed {run_dir} at frame {loop.global_step} after {loop.updates} updates (replay "
                       f"{len(replay)} steps); the episodes in progress when it stopped start afresh")
    path, step0, start, measured = os.path.join(run_dir, CHECKPOINT), loop.global_step, time.time(), False
    warmup, interrupted, bad = min(args.learning_starts, args.total_timesteps), None, None  # random actions, no updates
    progress.print(f"cost: {B * (K + 1)} + {B * 2} replayed steps per update ({B} windows of --horizon + 1 = {K + 1} "
                   f"steps, {B} transitions), 1 update per env step (UTD 1), about "
                   f"{args.total_timesteps - max(warmup, step0)} updates {'from here' if ck else 'in all'}; "
                   + (f"resumed at frame {step0}" + (f", warm-up with random actions until frame {warmup}"
                                                     if step0 < warmup else "") if ck else
                      f"warm-up of {warmup} env steps with random actions")
                   + ", wall time projected after the first updates")

    def run_eval() -> list:  # (the status line says [eval] meanwhile)
        phase, progress.phase = progress.phase, "eval"
        returns = evaluate(agent, eval_env, args.eval_episodes, device)
        progress.phase = phase
        return returns

    def checkpoint():  # loop.saved: the frame of the last checkpoint; the TensorBoard points up to it are flushed first
        with deferred_signals():
            loop.saved = loop.global_step
            writer.flush()
            save_checkpoint(path, args, nets, optims, vars(loop), replay, gens)

    progress.step(step0, loop.updates, eval_return=loop.last_eval)  # (a resumed run's rates start from here)
    progress.set_phase("warmup", warmup)
    threading.Thread(target=progress.heartbeat, daemon=True).start()
    obs, _ = envs.reset(seed=args.seed + step0)  # (+ the step: a resumed run meets new episodes)
    reward, is_first, is_terminal, done = np.zeros(N), np.ones(N, bool), np.zeros(N, bool), np.zeros(N, bool)
    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while loop.global_step < args.total_timesteps:
            # Collect. DEVIATION: Table 3 gives linear(1.0, 0.1, 100000) without an origin; we count after the
            # warm-up as the official code does
            std = linear_schedule(args.expl_start, args.expl_end, args.expl_duration,
                                  max(loop.global_step - args.learning_starts, 0))
            if loop.global_step < args.learning_starts:  # [Table 3] warm-up: uniform random actions
                action = rng.uniform(space.low, space.high, (N, *space.shape)).astype(np.float32)
            else:
                action = act(agent, torch.as_tensor(obs, dtype=torch.float32, device=device), std, False).cpu().numpy()
            with deferred_signals():  # a row is written whole or not at all
                replay.add(obs, action, reward, is_first, is_terminal)
            obs, reward, term, trunc, infos = envs.step(action)  # [official code] env units, no rescaling
            frames = int((~done).sum())  # a step right after an episode end only resets (NEXT_STEP autoreset)
            is_first, is_terminal, done = done, term, term | trunc
            loop.global_step += frames
            for i in np.flatnonzero(infos.get("_episode", np.zeros(N, bool))):
                loop.recent_returns = (loop.recent_returns + [float(infos["episode"]["r"][i])])[-10:]
                writer.add_scalar("charts/episodic_return", infos["episode"]["r"][i], loop.global_step)
                writer.add_scalar("charts/episodic_length", infos["episode"]["l"][i], loop.global_step)

            # Train: UTD 1, one update (both phases) per env step
            if loop.global_step >= args.learning_starts and replay.count > K:
                if progress.phase == "warmup":
                    progress.set_phase("train", args.total_timesteps)
                with deferred_signals():  # the frame's updates and their counters, whole (a signal waits for them)
                    for _ in range(frames):
                        # DEVIATION: windows never cross an episode start (the official sample_seq checks terminals)
                        seq, batch = ({k: torch.as_tensor(v, device=device) for k, v in
                                       replay.sample(B, T, within_episode=True).items()} for T in (K + 1, 2))
                        loop.metrics = update(agent, optims, groups, seq, batch, std, args)
                        loop.updates += 1
                        # DEVIATION: the official clip_grad_norm_(error_if_nonfinite=True) raises inside the update
                        # (a host sync); we record on device where each metric first went non-finite, check at log time
                        loop.first_bad = track_non_finite(loop.metrics, loop.first_bad, loop.updates)
            progress.step(loop.global_step, loop.updates, np.mean(loop.recent_returns or np.nan))
            t0, _, u0 = progress.samples[0]  # (the train phase's first rate sample: its start, for 120 s)
            if progress.phase == "train" and not measured and loop.updates - u0 >= 10 and progress.clock() - t0 >= 20:
                measured = True
                rest = progress.eta()  # (the train phase's ETA at its rate so far)
                progress.print(f"measured: {1 / progress.rates()[1]:.2f} s per update with acting; projected wall time "
                               f"of the run{' from here' if ck else ''} {fmt_time(time.time() - start + rest)} "
                               f"(evaluations extra)")

            # Log (host syncs only here), evaluate, checkpoint (between steps, never inside an update)
            if loop.global_step >= loop.next_log:
                bad = non_finite_message(list(loop.metrics), loop.first_bad, loop.global_step)
                if bad:
                    break
                values = {k: float(v) for k, v in loop.metrics.items()}
                sps = (loop.global_step - step0) / (time.time() - start)
                for k, v in {**values, "charts/SPS": sps, "stats/expl_std": std}.items():
                    writer.add_scalar(k, v, loop.global_step)
                progress.print(progress.line() + f" | actor loss {values.get('losses/actor', float('nan')):.3f}")
                loop.next_log += args.log_every
            if loop.next_eval <= loop.global_step < args.total_timesteps:  # (the last step: the final evaluation)
                loop.last_eval = float(np.mean(run_eval()))
                loop.next_eval += args.eval_every  # (only now: an evaluation cut by a signal runs again after --resume)
                progress.step(loop.global_step, loop.updates, eval_return=loop.last_eval)
                writer.add_scalar("eval/episodic_return", loop.last_eval, loop.global_step)
            if args.checkpoint_every and loop.global_step < args.total_timesteps and \
                    loop.global_step - (loop.saved or 0) >= args.checkpoint_every:
                checkpoint()

        if not bad:  # Finish: the final evaluation, the finished run's checkpoint, --save-model
            returns = run_eval()
            loop.last_eval = float(np.mean(returns))
            loop.summary = {"final_eval_return": loop.last_eval, "eval_returns": returns,
                            "global_step": loop.global_step, "updates": loop.updates, "run_dir": run_dir,
                            "sps": (loop.global_step - step0) / (time.time() - start)}  # (before its point is logged:
            writer.add_scalar("eval/episodic_return", loop.last_eval, loop.global_step)  # a resume never logs it twice)
            if loop.global_step >= loop.next_eval:  # the final evaluation is also the one due at this step (a resumed
                loop.next_eval += args.eval_every  # run continues the schedule of the uninterrupted one)
            if args.checkpoint_every:  # --resume prints its JSON line, or continues it with a larger --total-timesteps
                checkpoint()
            if args.save_model:  # the same format without the replay's head (--eval-checkpoint reads both)
                save_checkpoint(os.path.join(run_dir, f"{args.exp_name}.pt"), args, nets, optims, vars(loop), gens=gens)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (on_signal), never inside an update, a replay row or a save
        interrupted = str(e) or "SIGINT"
        if args.checkpoint_every and loop.saved != loop.global_step:  # the state as it is now, resumable
            with contextlib.suppress(KeyboardInterrupt):  # (a second signal waited for the checkpoint)
                checkpoint()
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        progress.close()
        writer.close()
        close_envs(envs, eval_env, kill=interrupted is not None)
        if args.track:
            wandb.finish()
    if interrupted or bad:  # (the events up to the last log are written, the envs closed)
        print(f"error: {bad}; last checkpoint: {path if loop.saved is not None else 'none'}" if bad else
              f"interrupted ({interrupted}) at frame {loop.global_step}/{args.total_timesteps} after {loop.updates} "
              f"updates; " + (f"checkpoint written: --resume {run_dir} continues from frame {loop.global_step}"
                              if args.checkpoint_every else "no checkpoint (--checkpoint-every 0)"), file=sys.stderr)
        raise SystemExit(3 if bad else 130 if interrupted == "SIGINT" else 143)  # 128 + signal number, as a shell does
    print(json.dumps(loop.summary), flush=True)
    return loop.summary


if __name__ == "__main__":
    try:
        main(tyro.cli(Args, default=saved_defaults(sys.argv[1:])))
    except KeyboardInterrupt:  # before the training loop (which handles its own)
        print("interrupted while starting; nothing was trained", file=sys.stderr)
        raise SystemExit(130)
