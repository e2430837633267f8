"""Tests of blast.py: KL balance gradients, target encoder EMA and batch split, AR prior teacher forcing,
BatchNorm modes, DreamerV2's truncated-normal actor, lambda-returns and slow critic, ablations, CLI."""

import dataclasses
import glob
import json
import math
import os
import re
import signal
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import blast as b
from smoke import (assert_clean_interrupt, assert_cli_error, assert_close_dicts, assert_finite_scalars,
                   assert_help_documents_every_hyperparameter, assert_interrupt_wrote_no_checkpoint,
                   assert_nan_action_stops_the_run, assert_progress_shows,
                   assert_sigterm_writes_a_checkpoint_then_resume_finishes, assert_tracks_offline,
                   cut_the_final_evaluation, eval_checkpoint_cli, events, kill_after_first_checkpoint,
                   non_finite_loss_run, progress_after_a_fast_phase, resume_cli, run_cli, truncated_copy)

TINY = dict(deter=16, hidden=16, stoch=4, classes=4, ar_steps=4, cnn_depth=2, units=16, mlp_layers=1,
            batch_size=4, batch_length=6, imag_horizon=3, prefill=20, pretrain=2, buffer_size=2000, time_limit=60)
OBS = (3, 64, 64)


def tiny_agent(seed=0, **kw):
    """Args with the TINY sizes (overridden by kw, after the ladder preset) and make_agent's outputs, 2-dim actions."""
    torch.manual_seed(seed)
    args = b.apply_ladder(b.Args(**{**TINY, **kw}))
    return (args, *b.make_agent(args, OBS, 2, torch.device("cpu")))


def batch(B=4, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = dict(obs=torch.randint(0, 256, (B, T, *OBS), dtype=torch.uint8, generator=g),
                action=torch.rand(B, T, 2, generator=g) * 2 - 1, reward=torch.rand(B, T, generator=g),
                is_first=torch.zeros(B, T, dtype=torch.bool), is_terminal=torch.zeros(B, T, dtype=torch.bool))
    data["is_first"][:, 0] = True
    return data


def wm_loss(wm, data, args, **kw):
    """world_model_loss with args' settings, overridden by kw."""
    a = dataclasses.replace(args, **kw)
    return b.world_model_loss(wm, data, a.kl_balance, a.kl_free, a.kl_scale, a.reward_scale, a.image_scale,
                              a.target_input_p, a.reconstruction, a.reward_grad)


def grads(loss, params):
    return [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params)]


def norm(gs):
    return sum(g.abs().sum() for g in gs).item()


# --- KL ----------------------------------------------------------------------------------------
def test_kl_balance_one_trains_only_the_prior_with_free_nats_on_the_batch_mean():
    # Two (b, t) entries, one latent of two classes: post [0.5, 0.5]; priors [a, 1 - a] with KL 0.5 and ~2.0.
    kl_of = lambda a: -math.log(2) - 0.5 * math.log(a * (1 - a))  # noqa: E731
    a1, a2 = 0.5 * (1 - math.sqrt(1 - 4 * math.exp(-2 * (0.5 + math.log(2))))), 0.002
    post = torch.zeros(2, 1, 1, 2, requires_grad=True)
    prior = torch.log(torch.tensor([[[[a1, 1 - a1]]], [[[a2, 1 - a2]]]])).requires_grad_()
    mean_kl = (kl_of(a1) + kl_of(a2)) / 2
    assert kl_of(a1) == pytest.approx(0.5) and mean_kl > 1.0
    loss, value = b.kl_loss(post, prior, balance=1.0, free=1.0)
    # max(1, mean KL) (free_avg), not mean(max(1, KL)) = (1 + KL_2) / 2
    assert loss.item() == pytest.approx(mean_kl, rel=1e-5) and value.item() == pytest.approx(mean_kl, rel=1e-5)
    g_post, g_prior = torch.autograd.grad(loss, [post, prior])
    assert torch.all(g_post == 0) and g_prior.abs().sum() > 0  # +SG: nothing reaches the posterior
    loss, _ = b.kl_loss(post, prior, balance=0.8, free=1.0)  # DreamerV2: both sides
    g_post, g_prior = torch.autograd.grad(loss, [post, prior])
    assert g_post.abs().sum() > 0 and g_prior.abs().sum() > 0
    loss, _ = b.kl_loss(post, prior, balance=1.0, free=5.0)  # below the free nats: no gradient at all
    assert loss.item() == 5.0 and torch.autograd.grad(loss, prior)[0].abs().sum() == 0


def test_world_model_kl_gradient_reaches_the_encoder_only_with_balance_below_one(one_thread):
    # T = 1: h_1 comes from the zero state, so the KL reaches the encoder only through the posterior term.
    args, wm, *_ = tiny_agent(ladder="sg", reward_scale=0.0, image_scale=0.0)
    data = batch(T=1)
    enc, prior_params = list(wm.encoder.parameters()), list(wm.rssm.img_dist.parameters())
    loss = wm_loss(wm, data, args, kl_balance=1.0, kl_free=0.0)[0]
    assert norm(grads(loss, enc)) == 0 and norm(grads(loss, prior_params)) > 0
    loss = wm_loss(wm, data, args, kl_balance=0.8, kl_free=0.0)[0]
    assert norm(grads(loss, enc)) > 0


# --- Target encoder -----------------------------------------------------------------------------
def test_ema_update_by_hand_and_batchnorm_statistics_not_copied(one_thread):
    torch.manual_seed(0)
    online, target = b.Encoder(3, 2, batch_norm=True), b.Encoder(3, 2, batch_norm=True)
    with torch.no_grad():
        for p in target.parameters():
            p.normal_()
    online(torch.randint(0, 256, (8, *OBS), dtype=torch.uint8))  # train mode: online running stats move
    old_t = [p.clone() for p in target.parameters()]
    old_buffers = [x.clone() for x in target.buffers()]
    b.ema_update(target, online, 0.99)
    for p_t, p_old, p in zip(target.parameters(), old_t, online.parameters()):
        torch.testing.assert_close(p_t, 0.99 * p_old + 0.01 * p)
    for x_t, x_old, x in zip(target.buffers(), old_buffers, online.buffers()):
        assert torch.equal(x_t, x_old)  # running mean / var / count stay the target's own
    assert not torch.equal(target.net[1].running_mean, online.net[1].running_mean)


def test_update_copies_then_ema_after_every_model_step(one_thread):
    args, wm, actor, critic, slow, opts = tiny_agent()
    data = batch()
    with torch.no_grad():
        for p in wm.target_encoder.parameters():
            p.add_(1.0)
    bn_before = wm.target_encoder.net[1].running_mean.clone()
    b.update(wm, actor, critic, slow, opts, data, args, updates=0)  # the first update copies
    assert "keeps xi's own random init" in b.__doc__  # a DEVIATION: the official first update keeps the target
    for p_t, p in zip(wm.target_encoder.parameters(), wm.encoder.parameters()):
        assert torch.equal(p_t, p)
    # The target's BatchNorm statistics moved with its own forward pass and differ from the online ones.
    assert not torch.equal(wm.target_encoder.net[1].running_mean, bn_before)
    assert not torch.equal(wm.target_encoder.net[1].running_mean, wm.encoder.net[1].running_mean)
    old = [p.clone() for p in wm.target_encoder.parameters()]
    b.update(wm, actor, critic, slow, opts, batch(seed=1), args, updates=1)
    for p_t, p_old, p in zip(wm.target_encoder.parameters(), old, wm.encoder.parameters()):
        torch.testing.assert_close(p_t, 0.99 * p_old + 0.01 * p)
        assert not p_t.requires_grad
    assert not any(torch.equal(p_t, p) for p_t, p in zip(wm.target_encoder.parameters(), wm.encoder.parameters())
                   if p.dim() > 1)


def test_half_batch_split_feeds_online_then_target_posteriors(one_thread):
    args, wm, *_ = tiny_agent()
    data = batch()
    with torch.no_grad():
        for p in wm.target_encoder.parameters():
            p.mul_(1.5)  # target != online
    D = args.deter
    for p, n in ((0.5, 2), (0.0, 4), (1.0, 0), (0.25, 3)):
        torch.manual_seed(3)
        out = wm_loss(wm, data, args, target_input_p=p)[2]
        torch.manual_seed(3)  # the online posterior is the first thing sampled: same draws
        on_deter, on_stoch, _ = wm.rssm.observe(wm.encoder(data["obs"]), data["action"], data["is_first"])
        on_feat = b.feature(on_deter, on_stoch).detach()
        feat = out["feat"].detach()
        torch.testing.assert_close(feat[:n], on_feat[:n])
        torch.testing.assert_close(feat[n:], b.feature(out["t_deter"], out["t_stoch"])[n:])
        assert not torch.allclose(on_feat[:, :, :D], out["t_deter"])  # the two halves really differ
        # The prior is a one-step prediction from the mixed h_t, teacher-forced on the target sample.
        prior, _ = wm.rssm.prior(feat[..., :D], teacher=out["t_stoch"])
        torch.testing.assert_close(out["prior"].detach(), prior.detach())


# --- AR prior -------------------------------------------------------------------------------------
def test_ar_prior_teacher_forced_in_training_free_running_in_imagination(one_thread):
    torch.manual_seed(0)
    rssm = b.RSSM(deter=8, stoch=4, classes=3, hidden=8, action_dim=2, embed_dim=5, batch_norm=False, ar_steps=4)
    deter = torch.randn(6, 8)
    teacher = F.one_hot(torch.randint(0, 3, (6, 4)), 3).float()
    logits_a, _ = rssm.prior(deter, teacher)
    logits_b, _ = rssm.prior(deter, teacher)
    torch.testing.assert_close(logits_a, logits_b)  # teacher-forced: the logits ignore the prior's own draws
    other = teacher.clone()
    other[:, 1] = other[:, 1].roll(1, -1)  # change chunk 1 only
    logits_c, _ = rssm.prior(deter, other)
    torch.testing.assert_close(logits_c[:, :2], logits_a[:, :2])  # chunks 0, 1 do not see chunk 1
    assert not torch.allclose(logits_c[:, 2], logits_a[:, 2])  # chunk 2 is conditioned on chunk 1
    # Free-running: chunk i+1 is conditioned on the prior's own sample of chunk i.
    torch.manual_seed(5)
    free_logits, sample = rssm.prior(deter)
    torch.testing.assert_close(rssm.prior(deter, teacher=sample)[0], free_logits)
    assert not torch.allclose(rssm.prior(deter, teacher=1 - sample.detach())[0][:, 1:], free_logits[:, 1:])
    # img_step's latent is that free-running sample from h_t = f(h, z, a).
    stoch, action = F.one_hot(torch.randint(0, 3, (6, 4)), 3).float(), torch.rand(6, 2)
    torch.manual_seed(7)
    h, z = rssm.img_step(deter, stoch, action)
    torch.manual_seed(7)
    torch.testing.assert_close(h, rssm.recurrent(deter, stoch, action))
    torch.testing.assert_close(z, rssm.prior(h)[1])


def test_imagination_never_feeds_target_chunks(one_thread, monkeypatch):
    args, wm, actor, critic, slow, opts = tiny_agent()
    calls = []
    prior = wm.rssm.prior

    def recording_prior(deter, teacher=None):
        calls.append((tuple(deter.shape), teacher is None))
        return prior(deter, teacher)

    monkeypatch.setattr(wm.rssm, "prior", recording_prior)
    b.update(wm, actor, critic, slow, opts, batch(), args, updates=0)
    N = args.batch_size * args.batch_length
    assert calls[0] == ((args.batch_size, args.batch_length, args.deter), False)  # training: teacher-forced
    assert calls[1:] == [((N, args.deter), True)] * args.imag_horizon  # imagination: free-running


# --- Behaviour: DreamerV2's actor, critic, returns ---------------------------------------------------
def test_trunc_normal_samples_log_prob_entropy_by_hand():
    Phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    mu, sd = 0.6, 0.5
    d = b.TruncNormal(torch.full((200_000, 1), mu), torch.full((200_000, 1), sd))
    torch.manual_seed(0)
    x = d.rsample()
    assert x.min() >= -1 + 1e-6 - 1e-7 and x.max() <= 1 - 1e-6 + 1e-7
    a, bb = (-1 - mu) / sd, (1 - mu) / sd
    Z = Phi(bb) - Phi(a)
    phi = lambda v: math.exp(-v * v / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    assert x.mean().item() == pytest.approx(mu + sd * (phi(a) - phi(bb)) / Z, abs=3e-3)  # truncated mean
    # log-prob: ln phi((x - mu) / sd) - ln sd - ln Z
    pts = torch.tensor([[-0.9], [0.0], [0.6], [0.99]])
    d1 = b.TruncNormal(torch.full((4, 1), mu), torch.full((4, 1), sd))
    want = [math.log(phi((v - mu) / sd) / sd / Z) for v in pts[:, 0].tolist()]
    torch.testing.assert_close(d1.log_prob(pts), torch.tensor(want))
    # Entropy against numerical integration of -p ln p on [-1, 1]; two action dims sum.
    grid = torch.linspace(-1, 1, 20001, dtype=torch.float64)[:, None]
    d64 = b.TruncNormal(torch.tensor([[mu]], dtype=torch.float64), torch.tensor([[sd]], dtype=torch.float64))
    lp = d64.log_prob(grid)
    assert torch.trapezoid(lp.exp(), grid[:, 0]).item() == pytest.approx(1.0, abs=1e-6)
    assert d64.entropy().item() == pytest.approx(torch.trapezoid(-lp.exp() * lp, grid[:, 0]).item(), abs=1e-6)
    d2 = b.TruncNormal(torch.tensor([[mu, 0.0]]), torch.tensor([[sd, 1.0]]))
    d0 = b.TruncNormal(torch.tensor([[0.0]]), torch.tensor([[1.0]]))
    assert d2.entropy().item() == pytest.approx(d64.entropy().item() + d0.entropy().item(), rel=1e-5)
    # Reparameterised: the sample moves with the mean.
    m = torch.zeros(3, 2, requires_grad=True)
    b.TruncNormal(m, torch.ones(3, 2)).rsample().sum().backward()
    assert torch.all(m.grad > 0)


def test_actor_is_dreamerv2_trunc_normal():
    torch.manual_seed(0)
    actor = b.Actor(feat_dim=5, action_dim=2, units=8, layers=1, min_std=0.1)
    feat = torch.randn(7, 5) * 3
    raw_mean, raw_std = actor.net(feat).chunk(2, -1)
    dist = actor(feat)
    torch.testing.assert_close(dist.mean, torch.tanh(raw_mean))
    torch.testing.assert_close(dist.std, 2 * torch.sigmoid(raw_std / 2) + 0.1)
    torch.testing.assert_close(dist.mode, torch.tanh(raw_mean))


def test_discrete_actor_is_dreamerv2_onehot():
    torch.manual_seed(0)
    actor = b.Actor(feat_dim=5, action_dim=3, units=8, layers=1, min_std=0.1, discrete=True)
    feat = torch.randn(4000, 5) * 3
    dist = actor(feat)
    logits = dist.logits
    torch.testing.assert_close(logits, actor.net(feat))  # no unimix, no temperature (DreamerV2 OneHotDist)
    p = F.softmax(logits, -1)
    idx = torch.randint(0, 3, (4000,))
    torch.testing.assert_close(dist.log_prob(F.one_hot(idx, 3).float()), torch.log(p[torch.arange(4000), idx]))
    torch.testing.assert_close(dist.entropy(), -(p * p.log()).sum(-1))
    torch.testing.assert_close(dist.mode, F.one_hot(logits.argmax(-1), 3).float())
    sample = dist.rsample()
    torch.testing.assert_close(sample.detach(), F.one_hot(sample.detach().argmax(-1), 3).float())  # one-hot values
    assert (sample.detach().mean(0) - p.mean(0).detach()).abs().max() < 0.03  # drawn from pi
    # Straight-through: d sample / d logits = d softmax / d logits.
    w = torch.tensor([1.0, -2.0, 0.5])
    g_sample = torch.autograd.grad((sample * w).sum(), logits, retain_graph=True)[0]
    torch.testing.assert_close(g_sample, torch.autograd.grad((p * w).sum(), logits)[0])


def test_lambda_return_hand_computed_dreamerv2_convention():
    # r_t of state t; V_2 = r_2 + d (0.5 v_3 + 0.5 v_3) with V_3 = bootstrap v_3 = 4, d = 0.9, lam = 0.5:
    # V_2 = 3 + 0.9 * 4 = 6.6;  V_1 = 2 + 0.9 (0.5 * 2 + 0.5 * 6.6) = 5.87;  V_0 = 1 + 0.9 (0.5 * 1 + 0.5 * 5.87) = 4.0915
    reward, value = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[0.5], [1.0], [2.0]])
    disc, boot = torch.full((3, 1), 0.9), torch.tensor([4.0])
    torch.testing.assert_close(b.lambda_return(reward, value, disc, boot, 0.5), torch.tensor([[4.0915], [5.87], [6.6]]))
    ret = b.lambda_return(reward, value, disc, boot, 1.0)  # Monte Carlo: 1 + 0.9 * 2 + 0.81 * 3 + 0.729 * 4
    assert ret[0, 0].item() == pytest.approx(1 + 1.8 + 2.43 + 2.916)
    ret = b.lambda_return(reward, value, disc, boot, 0.0)  # one-step: r_t + d v_{t+1}
    torch.testing.assert_close(ret[:, 0], torch.tensor([1 + 0.9 * 1.0, 2 + 0.9 * 2.0, 3 + 0.9 * 4.0]))


def test_actor_critic_losses_hand_computed(one_thread):
    """Constant reward r, slow critic v', critic v, entropy 0: V_t = r + g ((1 - lam) v' + lam V_{t+1}),
    actor -mean_t g^t V_{t+1} (t = 0..H-2), critic mean_t g^t -ln N(V_t; v, 1) (t = 0..H-1)."""
    args, wm, actor, critic, slow, _ = tiny_agent()
    r, v, vs, g, lam, H = 0.3, -0.2, 1.5, 0.9, 0.5, 3
    for head, c in ((wm.reward, r), (critic.net, v), (slow.net, vs)):
        with torch.no_grad():
            head[-1].weight.zero_()
            head[-1].bias.fill_(c)
    deter = torch.randn(5, args.deter)
    stoch = F.one_hot(torch.randint(0, 4, (5, 4)), 4).float()
    actor_loss, critic_loss, _ = b.actor_critic_loss(wm, actor, critic, slow, deter, stoch, H, g, lam, 0.0)
    V = [0.0] * H
    nxt = vs  # bootstrap v'(s_H)
    for t in reversed(range(H)):
        V[t] = r + g * ((1 - lam) * vs + lam * nxt)
        nxt = V[t]
    assert actor_loss.item() == pytest.approx(-(V[1] + g * V[2]) / 2, rel=1e-5)
    nll = lambda t: 0.5 * (t - v) ** 2 + 0.5 * math.log(2 * math.pi)  # noqa: E731
    assert critic_loss.item() == pytest.approx(sum(g ** t * nll(V[t]) for t in range(H)) / H, rel=1e-5)


def test_reinforce_actor_loss_hand_computed(one_thread, monkeypatch):
    """Discrete actor, constant reward r and slow critic v', fixed logits, a_t always action 1:
    actor -mean_t g^t (ln pi(1) sg(V_{t+1} - v') + eta H[pi]) over t = 0..H-2; no gradient through the dynamics."""
    args = b.apply_ladder(b.Args(**TINY))
    torch.manual_seed(0)
    wm, actor, critic, slow, _ = b.make_agent(args, OBS, 3, torch.device("cpu"), discrete=True)
    r, vs, g, lam, H, eta = 0.3, 1.5, 0.9, 0.5, 3, 0.1
    bias = torch.tensor([0.2, -0.4, 1.0])
    for head, c in ((wm.reward, r), (slow.net, vs), (actor.net, bias)):
        with torch.no_grad():
            head[-1].weight.zero_()
            head[-1].bias.copy_(torch.as_tensor(c))
    monkeypatch.setattr(b.OneHot, "rsample", lambda self: F.one_hot(torch.ones_like(self.logits[..., 0]).long(), 3)
                        .float() + 0 * self.logits)
    deter, stoch = torch.randn(5, args.deter), F.one_hot(torch.randint(0, 4, (5, 4)), 4).float()
    wm.requires_grad_(False)
    loss = b.actor_critic_loss(wm, actor, critic, slow, deter, stoch, H, g, lam, eta, reinforce=True)[0]
    V = [0.0] * H
    nxt = vs
    for t in reversed(range(H)):
        V[t] = r + g * ((1 - lam) * vs + lam * nxt)
        nxt = V[t]
    logp = F.log_softmax(bias, -1)
    ent = -(logp.exp() * logp).sum().item()
    want = -((logp[1].item() * (V[1] - vs) + eta * ent) + g * (logp[1].item() * (V[2] - vs) + eta * ent)) / 2
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # Without the score (and the entropy) nothing is left: no gradient reaches the actor through the dynamics.
    monkeypatch.setattr(b.OneHot, "log_prob", lambda self, x: (x * self.logp).sum(-1).detach())
    loss = b.actor_critic_loss(wm, actor, critic, slow, deter, stoch, H, g, lam, 0.0, reinforce=True)[0]
    assert norm(grads(loss, list(actor.parameters()))) == 0
    # --actor-grad auto: reinforce for a discrete actor, dynamics for a continuous one (DreamerV2), as update chooses.
    class Stop(Exception):
        pass

    def record(*a):
        seen.append(a[-1])
        raise Stop

    seen = []
    monkeypatch.setattr(b, "actor_critic_loss", record)
    for discrete, actor_grad, want_reinforce in ((True, "auto", True), (False, "auto", False),
                                                 (True, "dynamics", False), (False, "reinforce", True)):
        data = batch()
        if discrete:
            data["action"] = F.one_hot(torch.randint(0, 3, (4, 6)), 3).float()
        agent = b.make_agent(args, OBS, 3 if discrete else 2, torch.device("cpu"), discrete)
        with pytest.raises(Stop):
            b.update(*agent, data, dataclasses.replace(args, actor_grad=actor_grad), 0)
        assert seen[-1] == want_reinforce


def test_actor_gradient_flows_through_the_dynamics(one_thread, monkeypatch):
    args, wm, actor, critic, slow, _ = tiny_agent()  # full BLAST: AR prior, BatchNorm
    deter, stoch = torch.randn(8, args.deter), F.one_hot(torch.randint(0, 4, (8, 4)), 4).float()
    wm.requires_grad_(False)
    params = list(actor.parameters())
    loss = b.actor_critic_loss(wm, actor, critic, slow, deter, stoch, 3, 0.99, 0.95, 0.0)[0]
    assert norm(grads(loss, params)) > 0
    # With the imagined actions cut from the graph no gradient is left: it all came through the dynamics.
    rsample = b.TruncNormal.rsample
    monkeypatch.setattr(b.TruncNormal, "rsample", lambda self: rsample(self).detach())
    loss = b.actor_critic_loss(wm, actor, critic, slow, deter, stoch, 3, 0.99, 0.95, 0.0)[0]
    assert norm(grads(loss, params)) == 0


class ToyDynamics:
    """h_{t+1} = h_t + [a_t, 0...]: the first state dimension accumulates the first action."""

    def img_step(self, deter, stoch, action):
        return deter + F.pad(action, (0, deter.shape[-1] - action.shape[-1])), stoch


@pytest.mark.parametrize("dim, sign", [(0, 1.0), (0, -1.0), (1, 1.0)])
def test_actor_learns_the_rewarded_action_direction(dim, sign, one_thread):
    """Reward = sign * h[dim] (rewards sign * a[dim] > 0, ignores the other action): a few actor updates
    move the mean of a[dim] that way, more than the other one (which only moves through the shared layers)."""
    torch.manual_seed(0)
    D, S, K = 6, 2, 3
    reward = torch.nn.Linear(D + S * K, 1)
    with torch.no_grad():
        reward.weight.zero_()
        reward.bias.zero_()
        reward.weight[0, dim] = sign
    wm = types.SimpleNamespace(rssm=ToyDynamics(), reward=reward)
    actor = b.Actor(D + S * K, 2, 16, 2, 0.1)
    critic = b.Critic(D + S * K, 16, 1)
    slow = b.Critic(D + S * K, 16, 1).requires_grad_(False)
    deter, stoch = torch.zeros(64, D), F.one_hot(torch.randint(0, K, (64, S)), K).float()
    opt = torch.optim.Adam(actor.parameters(), lr=1e-3)
    before = actor(b.feature(deter, stoch)).mean.mean(0).detach()
    for _ in range(10):
        loss = b.actor_critic_loss(wm, actor, critic, slow, deter, stoch, 5, 0.99, 0.95, 0.0)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    change = actor(b.feature(deter, stoch)).mean.mean(0).detach() - before
    assert sign * change[dim] > 0.05  # pushed towards the rewarded direction
    assert abs(change[1 - dim]) < abs(change[dim])


def test_slow_critic_hard_copy_every_100_updates(one_thread):
    critic, slow = b.Critic(4, 8, 1), b.Critic(4, 8, 1)
    copies = []
    for u in range(250):
        with torch.no_grad():
            critic.net[-1].bias.fill_(float(u))
        b.slow_critic_update(slow, critic, u, 100)
        copies.append(slow.net[-1].bias.item())
    assert copies[:3] == [0.0, 0.0, 0.0] and copies[99] == 0.0 and copies[100] == 100.0 and copies[199] == 100.0
    assert copies[200] == 200.0 and copies[249] == 200.0
    # Inside update(): update 100 copies the critic after its step, update 101 leaves the slow critic alone.
    args, wm, actor, critic, slow, opts = tiny_agent()
    b.update(wm, actor, critic, slow, opts, batch(), args, updates=100)
    assert all(torch.equal(p_s, p) for p_s, p in zip(slow.parameters(), critic.parameters()))
    b.update(wm, actor, critic, slow, opts, batch(seed=1), args, updates=101)
    assert not all(torch.equal(p_s, p) for p_s, p in zip(slow.parameters(), critic.parameters()))


def test_rssm_zeroes_state_and_action_at_is_first():
    torch.manual_seed(0)
    rssm = b.RSSM(deter=8, stoch=2, classes=3, hidden=8, action_dim=2, embed_dim=5, batch_norm=False, ar_steps=1)
    deter, stoch, act, embed = torch.randn(2, 8), torch.rand(2, 2, 3), torch.randn(2, 2), torch.randn(2, 5)
    h, _, _ = rssm.obs_step(deter, stoch, act, embed, torch.tensor([True, False]))
    torch.testing.assert_close(h[0], rssm.recurrent(torch.zeros(1, 8), torch.zeros(1, 2, 3), torch.zeros(1, 2))[0])
    torch.testing.assert_close(h[1], rssm.recurrent(deter[1:], stoch[1:], act[1:])[0])
    # observe: step t consumes action[:, t-1], so the last action changes nothing.
    e, a = torch.randn(2, 4, 5), torch.randn(2, 4, 2)
    first = torch.zeros(2, 4, dtype=torch.bool)
    torch.manual_seed(1)
    h1 = rssm.observe(e, a, first)[0]
    a[:, -1] += 1
    torch.manual_seed(1)
    torch.testing.assert_close(rssm.observe(e, a, first)[0], h1)


# --- Ablations ------------------------------------------------------------------------------------
def test_ladder_presets_set_the_five_switches():
    rows = {"dreamerv2": (True, 0.8, False, False, 1), "no_recon": (False, 0.8, False, False, 1),
            "sg": (False, 1.0, False, False, 1), "ema": (False, 1.0, True, False, 1),
            "bn": (False, 1.0, True, True, 1), "ar": (False, 1.0, True, True, 8)}
    for rung, want in rows.items():
        a = b.apply_ladder(b.Args(ladder=rung))
        assert (a.reconstruction, a.kl_balance, a.target_encoder, a.batch_norm, a.ar_steps) == want, rung
    full = b.Args()
    assert b.apply_ladder(b.Args(ladder="ar")) == dataclasses.replace(full, ladder="ar")  # defaults = full BLAST


def test_minigrid_preset_is_the_a2_minigrid_column():
    a = b.apply_ladder(b.apply_preset(b.Args(preset="minigrid")))
    a2 = dict(prefill=10_000, train_every=1, total_timesteps=50_000, gamma=0.99, hidden=600, deter=600, stoch=16,
              classes=64, actor_grad="reinforce", kl_scale=0.1, reward_scale=100.0, reward_clamp="tanh",
              kl_balance=1.0, batch_norm=True, target_ema=0.99, target_input_p=0.5, ar_steps=16, target_encoder=True)
    assert {k: getattr(a, k) for k in a2} == a2  # BLAST A.2: the MiniGrid column and the BLAST rows
    assert (a.env_id, a.action_repeat, a.time_limit) == ("minigrid-dynamic-obstacles-6x6", 1, 100)
    # Flags given explicitly win; ar_steps follows stoch; the ladder still sets its switches afterwards.
    a = b.apply_preset(b.Args(preset="minigrid", deter=32, stoch=4, env_id="minigrid-dynamic-obstacles-6x6-video"))
    assert (a.deter, a.stoch, a.ar_steps, a.hidden, a.env_id) == (32, 4, 4, 600, "minigrid-dynamic-obstacles-6x6-video")
    assert b.apply_ladder(b.apply_preset(b.Args(preset="minigrid", ladder="bn"))).ar_steps == 1
    assert b.apply_preset(b.Args()) == b.Args()  # no preset: DMC defaults untouched
    with pytest.raises(SystemExit) as e:  # the message itself: the CLI case in test_bad_input_is_one_line...
        b.apply_preset(b.Args(preset="atari"))
    assert e.value.code == 2


def test_reward_clamp_tanh_squashes_the_replayed_rewards(one_thread, monkeypatch):
    seen = []

    def record(wm, data, *a):
        seen.append(data["reward"].clone())
        raise StopIteration

    monkeypatch.setattr(b, "world_model_loss", record)
    args, *agent = tiny_agent()
    data = batch()
    data["reward"] = torch.tensor([[-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]]).repeat(4, 1)
    for clamp in ("identity", "tanh"):
        with pytest.raises(StopIteration):
            b.update(*agent, data, dataclasses.replace(args, reward_clamp=clamp), 0)
    torch.testing.assert_close(seen[0], data["reward"])
    torch.testing.assert_close(seen[1], torch.tanh(data["reward"]))


@pytest.mark.parametrize("kw", [dict(ladder=r) for r in b.LADDER] + [dict(reward_grad=False), dict(ar_steps=2),
                                                                      dict(target_input_p=1.0)])
def test_every_ablation_runs_one_finite_update(kw, one_thread):
    args, wm, actor, critic, slow, opts = tiny_agent(**kw)
    assert (wm.target_encoder is not None) == args.target_encoder
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in wm.modules()) == args.batch_norm
    assert hasattr(wm.rssm, "ar_cell") == (args.ar_steps > 1)
    m = b.update(wm, actor, critic, slow, opts, batch(), args, updates=0)
    assert all(torch.isfinite(v) for v in m.values())
    assert m["grad_norm/world_model"] > 0 and m["grad_norm/actor"] > 0 and m["grad_norm/decoder"] > 0


@pytest.mark.parametrize("kw, discrete", [({}, False), ({"ladder": "dreamerv2"}, True)])
def test_bf16_update_stays_close_to_float32(kw, discrete, one_thread):
    """--precision bf16: the same update (the second: the target encoder's EMA step) from the same state and RNG gives
    losses within 2% of float32 (bf16 keeps 8 bits of mantissa, ~0.4% per rounding); every metric and every floating
    state_dict entry (parameters, target encoder, BatchNorm statistics) stays float32 and finite. Full BLAST
    (BatchNorm, AR prior, target encoder, truncated-normal actor) and the DreamerV2 rung with one-hot actions."""
    out, states = {}, {}
    for precision in ("fp32", "bf16"):
        args, wm, actor, critic, slow, opts = tiny_agent(precision=precision, **kw)
        if discrete:
            torch.manual_seed(0)
            actor = b.Actor(args.deter + args.stoch * args.classes, 2, args.units, args.mlp_layers,
                            args.actor_min_std, discrete=True)
            opts = (opts[0], torch.optim.Adam(actor.parameters(), lr=args.actor_lr, eps=args.ac_eps), *opts[2:])
        torch.manual_seed(1)
        out[precision] = b.update(wm, actor, critic, slow, opts, batch(), args, updates=1)
        states[precision] = [t for net in (wm, actor, critic, slow) for t in net.state_dict().values()
                             if t.is_floating_point()]
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in states[precision])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out["bf16"].values())
    for k in ("losses/world_model", "losses/kl", "losses/reward", "losses/image", "stats/kl", "losses/critic",
              "stats/actor_entropy"):
        assert out["bf16"][k].item() == pytest.approx(out["fp32"][k].item(), rel=2e-2, abs=1e-3), k
    # The actor loss and the imagined return are small means (~0.1 here) of lambda-returns of both signs whose
    # elements are ~0.45 in size and differ by ~0.003 (0.7%: imagination after the model's bf16-trained step, through
    # the bf16 prior and heads); the mean cancels, so its error is relative to the elements: abs 5e-3 (1% of them).
    for k in ("losses/actor", "stats/imagined_return"):
        assert out["bf16"][k].item() == pytest.approx(out["fp32"][k].item(), rel=2e-2, abs=5e-3), k
    assert out["bf16"]["losses/image"].item() != out["fp32"]["losses/image"].item()  # bf16 did run


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_update_equals_eager(backend, one_thread, inductor_fallback_random, monkeypatch):
    """--compile: two compiled updates (update 0 copies the target encoder, update 1 its EMA step) from the same
    state and RNG give the eager metrics, parameters, target encoder and BatchNorm running statistics within float32
    tolerance (inductor reorders sums; its random numbers are switched to eager's for the comparison). Full BLAST:
    BatchNorm in the encoders and the posterior, the EMA target encoder and the AR prior, all in the graph.
    aot_eager traces forward and backward without generating code; inductor (a cold compile takes minutes on a
    CPU) runs with `python -m pytest -m slow`."""
    monkeypatch.setattr(b, "COMPILED", {})  # compiled afresh for these tiny shapes
    batches = [batch(seed=0), batch(seed=1)]
    out, states = {}, {}
    for compile in (False, True):
        args, wm, actor, critic, slow, opts = tiny_agent(compile=compile, compile_backend=backend)
        parts = (wm.encoder, wm.target_encoder, wm.rssm, wm.reward, wm.decoder, actor, critic)
        before = [{k: t.clone() for k, t in m.state_dict().items()} for m in parts]
        torch.manual_seed(1)
        out[compile] = [b.update(wm, actor, critic, slow, opts, data, args, updates=u) for u, data in enumerate(batches)]
        states[compile] = {f"{i}.{k}": t for i, net in enumerate((wm, actor, critic, slow))
                           for k, t in net.state_dict().items()}
        for m, old in zip(parts, before):  # the updates did train (and moved the EMA target and BatchNorm statistics)
            assert not all(torch.equal(t, old[k]) for k, t in m.state_dict().items()), type(m).__name__
    assert len(b.COMPILED) == 1 and backend in b.COMPILED  # the compiled functions were used (and made once)
    for eager, compiled in zip(out[False], out[True]):
        assert_close_dicts(compiled, eager)
    assert_close_dicts(states[True], states[False])  # parameters, target encoder, BatchNorm statistics and counts


def test_reconstruction_and_reward_grad_switches(one_thread):
    args, wm, *_ = tiny_agent(ladder="ema")
    data = batch()
    enc, dec = list(wm.encoder.parameters()), list(wm.decoder.parameters())
    for reconstruction in (True, False):  # DreamerV2 / -recon: pixels train the representation or only the decoder
        loss, m, _ = wm_loss(wm, data, args, reconstruction=reconstruction, kl_scale=0.0, reward_scale=0.0)
        torch.testing.assert_close(loss.detach(), m["losses/image"])
        assert (norm(grads(loss, enc)) > 0) == reconstruction and norm(grads(loss, dec)) > 0
    # The image loss of the unit Normal: its value includes 0.5 ln(2 pi) per pixel.
    assert m["losses/image"].item() > 0.5 * math.log(2 * math.pi) * 3 * 64 * 64
    torch.manual_seed(0)
    loss, m, _ = wm_loss(wm, data, args, kl_scale=2.0, reward_scale=3.0, image_scale=0.5)
    torch.testing.assert_close(loss.detach(), 2 * m["losses/kl"] + 3 * m["losses/reward"] + 0.5 * m["losses/image"])
    # A.3 latent prediction only: the reward loss trains the head but not the representation.
    for reward_grad in (True, False):
        loss = wm_loss(wm, data, args, reward_grad=reward_grad, kl_scale=0.0, image_scale=0.0)[0]
        assert (norm(grads(loss, enc)) > 0) == reward_grad
        assert norm(grads(loss, list(wm.reward.parameters()))) > 0


# --- Acting, the command line ----------------------------------------------------------------------
def tiny_main_args(**kw):
    return b.Args(**{**TINY, "time_limit": 40, "env_id": "cartpole-balance", "num_envs": 1, "total_timesteps": 80,
                     "eval_every": 10**6, "eval_episodes": 1, "log_every": 80, "video_every": 0, **kw})


def test_acting_is_in_eval_mode_with_the_target_encoder(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    seen, policy = [], b.policy

    def recording_policy(wm, actor, state, obs, is_first, explore=True):
        bn = [m for m in wm.target_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        stats = [m.running_mean.clone() for m in bn]
        out = policy(wm, actor, state, obs, is_first, explore)
        seen.append((wm.training, wm.target_encoder.training, wm.rssm.training,
                     all(torch.equal(s, m.running_mean) for s, m in zip(stats, bn)), explore))
        return out

    monkeypatch.setattr(b, "policy", recording_policy)
    b.main(tiny_main_args(prefill=10, total_timesteps=60))
    assert seen and all(s[:4] == (False, False, False, True) for s in seen)  # eval mode, statistics untouched
    assert {s[4] for s in seen} == {True, False}  # sampling while training, the mode in evaluation
    # The acting encoder is the target encoder (and the online one without +EMA).
    _, wm, *_ = tiny_agent()
    assert wm.act_encoder is wm.target_encoder
    _, wm, *_ = tiny_agent(target_encoder=False)
    assert wm.act_encoder is wm.encoder


def test_same_seed_same_losses(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    first, second = b.main(tiny_main_args()), b.main(tiny_main_args())
    assert first["updates"] > 0 and first["losses"]
    assert first["losses"] == second["losses"]
    third = b.main(tiny_main_args(seed=2))
    assert third["losses"] != first["losses"]


@pytest.mark.parametrize("argv, needles", [
    (["--env-id", "walker-sprint"], ["--env-id", "walker-sprint"]),
    (["--env-id", "Hopper-v5"], ["--env-id Hopper-v5", "state task", "pixels"]),
    (["--total-timesteps", "-5"], ["--total-timesteps", "-5"]),
    (["--train-every", "0"], ["--train-every", "got 0"]),
    (["--prefill", "-1"], ["--prefill", "got -1"]),
    (["--batch-size", "1"], ["--batch-size", ">= 2", "got 1"]),
    (["--ar-steps", "3"], ["--ar-steps", "--stoch 8", "got 3"]),
    (["--ladder", "big"], ["--ladder", "dreamerv2|no_recon", "'big'"]),
    (["--preset", "atari"], ["--preset must be one of minigrid", "'atari'"]),
    (["--target-input-p", "1.5"], ["--target-input-p", "[0, 1]", "1.5"]),
    (["--gamma", "1.5"], ["--gamma", "1.5"]),
    (["--buffer-size", "10"], ["--buffer-size", "got 10"]),
    (["--checkpoint-every", "-1"], ["--checkpoint-every", "got -1"]),
    (["--precision", "fp16"], ["--precision must be one of fp32, bf16, got fp16"]),
    (["--compile-backend", "eager"], ["--compile-backend must be one of inductor, aot_eager, got eager"]),
    (["--seed", "-1"], ["--seed must be >= 0, got -1"]),
    (["--resume", "nowhere"], ["--resume nowhere: no such run directory (give the run's folder, e.g. runs/NAME)"]),
])
def test_bad_input_is_one_line_naming_the_flag(tmp_path, argv, needles):
    assert_cli_error("blast.py", tmp_path, argv, *needles)


def test_progress_eta_follows_the_current_phase():
    """Fake clock: a fast prefill (1000 frames/s), a pretrain burst (no frames, 4 updates/s, its ETA counts
    updates), then slow training (10 frames/s): the ETA is the training one, not the run's average."""
    p, now, out = progress_after_a_fast_phase(b, "prefill")
    p.set_phase("pretrain", 100)
    for t in range(1, 11):  # 10 s of pretraining: 40 of 100 updates
        now[0] = 2 + t
        p.step(2000, 4 * t)
    assert p.eta() == pytest.approx(15.0) and "pretrain ends in 15 s" in p.line()
    p.set_phase("train", 10_000)
    for t in range(1, 61):  # 60 s of training at 10 frames/s and 2 updates/s
        now[0] = 12 + t
        p.step(2000 + 10 * t, 40 + 2 * t)
    # ETA: the run's average (36 frames/s) would say 205 s
    assert_progress_shows(p, out, 10.0, 2.0, (10_000 - 2_600) / 10.0, "ETA 12.3 min", "updates 160 (2.00/s)")


def test_interrupt_stops_cleanly_with_events_written(tmp_path):
    """Ctrl-C with --checkpoint-every 0: one line saying that no checkpoint was written."""
    flags = {**TINY, "env_id": "cartpole-balance", "num_envs": 2, "total_timesteps": 100_000, "eval_every": 10**6,
             "eval_episodes": 1, "log_every": 40, "video_every": 0, "checkpoint_every": 0}
    assert "cost: 24 replayed steps per update" in assert_clean_interrupt("blast.py", tmp_path, flags, signal.SIGINT)
    assert_interrupt_wrote_no_checkpoint(tmp_path)


def test_sigterm_before_the_first_checkpoint_writes_one_then_resume_finishes(tmp_path):
    flags = {**TINY, "env_id": "cartpole-balance", "num_envs": 1, "total_timesteps": 600, "eval_every": 10**6,
             "eval_episodes": 1, "log_every": 40, "video_every": 0, "checkpoint_every": 10**6}
    assert_sigterm_writes_a_checkpoint_then_resume_finishes("blast.py", tmp_path, flags)


def test_resume_of_a_run_cut_in_its_final_evaluation_evaluates_then_finishes(tmp_path, monkeypatch, one_thread):
    """An evaluation cut by an interrupt runs again after --resume: here the final one, with the frames done."""
    monkeypatch.chdir(tmp_path)
    run_dir, loop = cut_the_final_evaluation(b, tiny_main_args(checkpoint_every=10**6), monkeypatch)
    assert loop["global_step"] == 80 and loop["eval_step"] == -1
    final = b.main(dataclasses.replace(b.saved_defaults(["--resume", run_dir]), resume=run_dir))
    assert final["global_step"] == 80 and final["updates"] == loop["updates"] and len(final["eval_returns"]) == 1


def test_track_writes_an_offline_wandb_run(tmp_path):
    flags = {**TINY, "env_id": "cartpole-balance", "num_envs": 1, "total_timesteps": 80, "eval_every": 80,
             "eval_episodes": 1, "log_every": 40, "video_every": 0, "time_limit": 40}
    assert_tracks_offline("blast.py", tmp_path, flags)


def test_help_documents_every_hyperparameter_with_its_source(capsys):
    assert_help_documents_every_hyperparameter(b.Args, capsys, (
        "BLAST A.2 DMC: rssm.deter 200", "BLAST A.2: kl.balance 1.0", "BLAST A.2: target_ema 0.99",
        "BLAST A.2: target_input_p 0.5", "DreamerV2 dmc_vision: model_opt.lr 3e-4", "BLAST A.2 DMC: train_every 5",
        "DreamerV2 slow_target_update 100", "BLAST A.3", "dreamerv2|no_recon|sg|ema|bn|ar"))


def test_smoke_cli(tmp_path):
    """The real command line with a tiny model: final JSON line, finite losses, events, videos, checkpoint."""
    flags = {**TINY, "env_id": "cartpole-balance", "num_envs": 1, "total_timesteps": 240, "eval_every": 160,
             "eval_episodes": 2, "log_every": 80, "video_every": 160, "prefill": 30}  # 30 rows hold a batch
    final, run_dir, ea = run_cli("blast.py", tmp_path, flags, ("--capture-video", "--save-model"))
    assert math.isfinite(final["final_eval_return"]) and len(final["eval_returns"]) == 2
    assert final["updates"] == 2 + (240 // 2 - 30) // 5  # pretrain + one per 5 agent steps after the prefill
    assert_finite_scalars(ea, (
        "losses/kl", "losses/reward", "losses/image", "losses/world_model", "losses/actor", "losses/critic",
        "eval/episodic_return", "charts/episodic_return", "charts/SPS"))
    assert {"openloop", "eval/video"} <= set(ea.Tags()["images"])
    assert sorted(os.listdir(os.path.join(run_dir, "videos"))) == ["eval_160.mp4", "eval_240.mp4"]
    ckpt = torch.load(os.path.join(run_dir, "blast.pt"), weights_only=True)  # the checkpoint format, no replay head
    assert {"wm", "actor", "critic", "slow_critic"} == set(ckpt["nets"]) and len(ckpt["opts"]) == 4
    assert any(k.startswith("target_encoder.") for k in ckpt["nets"]["wm"])
    assert ckpt["script"] == "blast.py" and ckpt["replay"] is None
    assert (ckpt["loop"]["global_step"], ckpt["loop"]["updates"]) == (240, final["updates"])


def test_smoke_cli_minigrid_preset(tmp_path):
    """--preset minigrid on a MiniGrid rendering with a tiny model: one-hot actions, REINFORCE, one update per step."""
    flags = {**TINY, "env_id": "minigrid-dynamic-obstacles-6x6-smaller-agent", "num_envs": 1, "total_timesteps": 150,
             "eval_every": 10**6, "eval_episodes": 1, "log_every": 50, "video_every": 0, "prefill": 30}
    del flags["time_limit"]  # the preset's (and the env's) 100 steps
    final, run_dir, ea = run_cli("blast.py", tmp_path, flags, ("--preset", "minigrid"))
    assert math.isfinite(final["final_eval_return"]) and final["global_step"] == 150
    assert final["updates"] == TINY["pretrain"] + (150 - 30)  # pretrain (TINY's), then train_every 1 (A.2)
    assert_finite_scalars(ea, ("losses/kl", "losses/reward", "losses/actor", "losses/critic", "charts/episodic_return"))
    assert [e.value for e in ea.Scalars("charts/episodic_length")] == [100]
    args = json.load(open(os.path.join(run_dir, "args.json")))
    assert (args["actor_grad"], args["reward_clamp"], args["reward_scale"], args["ar_steps"]) == ("reinforce", "tanh",
                                                                                                  100.0, 4)


# --- Checkpoints and resume ------------------------------------------------------------------------
def replay_obs(run_dir, rows):
    """The first `rows` observations of the one-stream replay file of a run (TINY's buffer of 2000 steps)."""
    return np.fromfile(os.path.join(run_dir, "replay", "obs.bin"), np.uint8).reshape(1, -1, *OBS)[:, :rows]


def test_resume_and_eval_checkpoint_cli(tmp_path, monkeypatch, capsys):
    """A finished run continues with a larger --total-timesteps from its end-of-run checkpoint (replay files kept,
    counters continued: the update count is the uninterrupted run's, so the train_every credit and the pretrain
    flag came back; no temporary file left); --eval-checkpoint prints its JSON line; bad checkpoints and changed
    flags give one error line."""
    flags = {**TINY, "env_id": "cartpole-balance", "num_envs": 1, "total_timesteps": 176, "eval_every": 1000,
             "eval_episodes": 1, "log_every": 80, "video_every": 0, "prefill": 30}  # 30 rows hold a batch
    final, run_dir, _ = run_cli("blast.py", tmp_path, flags)
    ck = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    # Training from frame 60: 2 pretrain + (176 - 60) / 2 // 5 updates, 3 agent steps of credit left over
    assert (final["updates"], ck["loop"]["updates"], ck["loop"]["train_credit"]) == (2 + 11, 13, 3)
    assert ck["loop"]["pretrained"] and ck["loop"]["global_step"] == 176
    rows = ck["replay"]["count"]  # 88 agent steps and the envs' reset steps
    assert rows > 88
    before = replay_obs(run_dir, rows)
    # (the CLI with --precision bf16 and --compile: flags a resumed run may change)
    out = resume_cli("blast.py", tmp_path, final["run_dir"], "--total-timesteps", "240", "--precision", "bf16",
                     "--compile", "--compile-backend", "aot_eager")
    assert f"resumed {final['run_dir']} at frame 176 after 13 updates (replay {rows} steps)" in out["stdout"]
    assert "compiling the update (--compile)" in out["stdout"] and "compiled the update in" in out["stdout"]
    # the console shows the model's terms, the monitoring decoder's NLL (~11,300 nats here) apart from them
    line = r"\| kl \d+\.\d\d \| reward nll \d+\.\d{3} \| image nll \d{4,}\n"
    assert re.search(line, out["stdout"]), out["stdout"][-600:]
    resumed = out["final"]
    # the uninterrupted run's count: 2 + (240 - 60) / 2 // 5 = 20 (without the credit 19, without the flag 22)
    assert resumed["global_step"] == 240 and resumed["updates"] == 20
    np.testing.assert_array_equal(replay_obs(run_dir, rows), before)
    assert not glob.glob(os.path.join(run_dir, "*.tmp")) and not glob.glob(os.path.join(run_dir, "replay", "*.tmp"))
    ea = events(run_dir)
    assert [e.step for e in ea.Scalars("charts/SPS")] == [80, 160, 240]  # next_log continued, nothing twice
    assert [e.step for e in ea.Scalars("eval/episodic_return")] == [176, 240]
    assert [e.value for e in ea.Scalars("charts/updates")] == [4, 12, 20]
    path = os.path.join(final["run_dir"], "checkpoint.pt")
    ev = eval_checkpoint_cli("blast.py", tmp_path, path, "--eval-episodes", "1")
    assert ev["global_step"] == 240 and len(ev["eval_returns"]) == 1 and math.isfinite(ev["eval_return"])
    assert ev["checkpoint"] == path and set(ev) == {"eval_return", "eval_returns", "global_step", "checkpoint"}
    # bad input through the command line: a changed model flag, a truncated checkpoint, another script's checkpoint
    assert_cli_error("blast.py", tmp_path, ["--resume", final["run_dir"], "--total-timesteps", "400", "--deter", "32"],
                     "--deter 32", "checkpoint's 16")
    os.makedirs(tmp_path / "cut")
    truncated_copy(os.path.join(run_dir, "checkpoint.pt"), tmp_path / "cut" / "checkpoint.pt")
    assert_cli_error("blast.py", tmp_path, ["--resume", "cut"], "truncated or corrupt", "cut/checkpoint.pt")
    torch.save({"script": "dreamerv3.py", "args": {"env_id": "walker-walk", "deter": 512}, "nets": {}},
               str(tmp_path / "other.pt"))
    assert_cli_error("blast.py", tmp_path, ["--eval-checkpoint", "other.pt"], "other.pt", "checkpoint of dreamerv3.py",
                     "not of blast.py")
    # ... and in-process, on the command line's defaults (saved_defaults): a changed environment or ladder rung, a
    # run that is already that long, a missing run dir
    monkeypatch.chdir(tmp_path)
    saved = dataclasses.replace(b.saved_defaults(["--resume", final["run_dir"]]), resume=final["run_dir"])
    assert saved.total_timesteps == 240 and saved.prefill == 30 and saved.ladder is None
    for kw, needles in ((dict(env_id="walker-walk"), ("--env-id walker-walk", "checkpoint's cartpole-balance")),
                        (dict(ladder="dreamerv2"), ("--ladder dreamerv2", "checkpoint's None")),
                        (dict(reconstruction=True), ("--reconstruction True", "checkpoint's False")),
                        (dict(total_timesteps=400, resume="no/such/dir"), ("--resume no/such/dir", "no such"))):
        with pytest.raises(SystemExit) as e:
            b.main(dataclasses.replace(saved, **{"total_timesteps": 400, **kw}))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
        assert all(n in err[0] for n in needles), (needles, err)
    # a finished run (killed before its JSON line, say): its saved summary, also with a smaller --total-timesteps;
    # an unfinished one refuses a --total-timesteps it has passed
    for total in (240, 200):
        summary = b.main(dataclasses.replace(saved, total_timesteps=total))
        assert {k: v for k, v in summary.items() if k != "losses"} == resumed and summary["losses"]
        assert capsys.readouterr().out.strip() == json.dumps(resumed)
    ck = {"args": {**dataclasses.asdict(saved), "total_timesteps": 400}, "loop": {"global_step": 240}}
    with pytest.raises(SystemExit):
        b.checked_against(dataclasses.replace(saved, total_timesteps=200), ck, "--resume")
    assert "--total-timesteps 200: the run is already at frame 240" in capsys.readouterr().err


@pytest.mark.parametrize("kw, discrete", [({}, False), ({"ladder": "dreamerv2"}, True)])
def test_update_after_restore_equals_the_uninterrupted_update(tmp_path, one_thread, kw, discrete):
    """Save after three updates, make two more (the slow critic is copied at update 3, not at 4); a fresh agent
    (other init) restored from the checkpoint, with the replay reopened from its files, draws the same batches and
    makes exactly the same two updates: metrics, parameters, target encoder, slow critic, BatchNorm statistics and
    all four Adams. Full BLAST with continuous actions, and the DreamerV2 rung (no target encoder, reconstruction,
    no BatchNorm, ar_steps 1) with one-hot actions."""
    from common.replay import ReplayBuffer

    a = b.apply_ladder(b.Args(**{**TINY, "slow_critic_every": 3, **kw}))
    B, T, N, A = a.batch_size, a.batch_length, 2, 3
    rng = np.random.default_rng(0)

    def agent(seed):
        torch.manual_seed(seed)
        nets, opts = b.build_agent(a, OBS, A, discrete, torch.device("cpu"))
        return nets, opts, ReplayBuffer(200, N, OBS, A, seed=a.seed, path=str(tmp_path / "replay"), resume=seed != 0)

    def step(nets, opts, replay, updates):
        data = {k: torch.as_tensor(v) for k, v in replay.sample(B, T).items()}
        return {k: v.item() for k, v in b.update(*nets.values(), opts, data, a, updates).items()}

    def same_copies(nets):
        return all(torch.equal(p, q) for p, q in zip(nets["slow_critic"].parameters(), nets["critic"].parameters()))

    nets, opts, replay = agent(0)
    for t in range(40):
        act = (np.eye(A, dtype=np.float32)[rng.integers(0, A, N)] if discrete
               else rng.uniform(-1, 1, (N, A)).astype(np.float32))
        replay.add(rng.integers(0, 256, (N, *OBS), dtype=np.uint8), act, rng.normal(size=N).astype(np.float32),
                   np.full(N, t % 15 == 0), np.zeros(N, bool))
    for u in range(3):
        step(nets, opts, replay, u)
    path = str(tmp_path / "checkpoint.pt")
    b.save_checkpoint(path, a, nets, opts, {"global_step": 80, "updates": 3}, replay)
    m3 = step(nets, opts, replay, 3)
    assert same_copies(nets)  # update 3 copied the critic
    m4 = step(nets, opts, replay, 4)
    assert not same_copies(nets)  # update 4 did not

    nets2, opts2, replay2 = agent(1)
    assert not torch.equal(nets2["wm"].encoder.net[0].weight, nets["wm"].encoder.net[0].weight)
    loop = b.restore_checkpoint(b.load_checkpoint(path, "--resume"), nets2, opts2, replay2)
    assert loop == {"global_step": 80, "updates": 3}
    assert (nets2["wm"].target_encoder is None) == (kw.get("ladder") == "dreamerv2")
    assert step(nets2, opts2, replay2, loop["updates"]) == m3 and same_copies(nets2)
    assert step(nets2, opts2, replay2, loop["updates"] + 1) == m4 and not same_copies(nets2)
    for k in nets:
        sd, sd2 = nets[k].state_dict(), nets2[k].state_dict()
        assert list(sd) == list(sd2)
        for n in sd:  # parameters and buffers: target encoder, BatchNorm running statistics and counts included
            assert torch.equal(sd[n], sd2[n]), (k, n)
    if a.batch_norm:
        assert any("running_mean" in n for n in nets2["wm"].state_dict())
    assert len(opts2) == 4
    for o, o2 in zip(opts, opts2):
        s1, s2 = o.state_dict()["state"], o2.state_dict()["state"]
        assert s1 and list(s1) == list(s2)
        assert all(torch.equal(s1[i][j], s2[i][j]) for i in s1 for j in s1[i])


def test_sigkill_after_first_checkpoint_then_resume(tmp_path):
    """--preset minigrid --ladder bn (one-hot actions, REINFORCE): SIGKILL right after the first checkpoint
    appears; --resume continues from the checkpoint's frame to the final JSON line with the uninterrupted run's
    update count, the replay rows written before the checkpoint intact, no temporary file left, no duplicated
    TensorBoard points, and the saved (resolved) flags: the preset is not applied again, so --eval-every 10000
    (Args' default, which the preset would turn into 2500) stays."""
    flags = {**TINY, "env_id": "minigrid-dynamic-obstacles-6x6-smaller-agent", "num_envs": 1, "total_timesteps": 150,
             "eval_every": 10**6, "eval_episodes": 1, "log_every": 50, "video_every": 0, "prefill": 30,
             "checkpoint_every": 60, "preset": "minigrid", "ladder": "bn"}
    del flags["time_limit"]  # the preset's (and the env's) 100 steps
    run_dir, ck = kill_after_first_checkpoint("blast.py", tmp_path, flags)
    saved, rows = ck["loop"]["global_step"], ck["replay"]["count"]
    assert saved == 60 and rows >= 60 and ck["loop"]["updates"] == 2 + (60 - 30)
    assert (ck["args"]["ar_steps"], ck["args"]["batch_norm"], ck["args"]["actor_grad"]) == (1, True, "reinforce")
    before = replay_obs(run_dir, rows)
    out = resume_cli("blast.py", tmp_path, run_dir, "--eval-every", "10000")
    assert f"at frame {saved} after {ck['loop']['updates']} updates" in out["stdout"]
    assert out["final"]["global_step"] == 150 and out["final"]["updates"] == 2 + (150 - 30)
    np.testing.assert_array_equal(replay_obs(run_dir, rows), before)
    assert not glob.glob(os.path.join(run_dir, "*.tmp")) and not glob.glob(os.path.join(run_dir, "replay", "*.tmp"))
    ea = events(run_dir)
    assert [e.step for e in ea.Scalars("charts/SPS")] == [50, 100, 150]  # TensorBoard continues, no duplicates
    args = json.load(open(os.path.join(run_dir, "args.json")))
    assert args.pop("eval_every") == 10000 and args.pop("resume") == run_dir
    assert args == {k: v for k, v in ck["args"].items() if k not in ("eval_every", "resume")}


def test_non_finite_loss_stops_the_run(tmp_path, monkeypatch, one_thread, capsys):
    monkeypatch.chdir(tmp_path)
    assert non_finite_loss_run(b, tiny_main_args(checkpoint_every=0), "losses/kl", monkeypatch, capsys) == [
        "error: non-finite losses/kl = nan in the updates logged at frame 80 (update 5); last checkpoint: none"]


def test_non_finite_loss_through_the_cli(tmp_path):
    """--model-lr 1e30 blows the world model up at its first updates: one line naming the metric, the frame, the
    update and the last checkpoint, exit code 3, no traceback, the events written. (--log-every 2: the check runs
    at the log step; a model gone NaN makes NaN actions, which can break the simulator's next step before that.)"""
    flags = {**TINY, "env_id": "cartpole-balance", "total_timesteps": 400, "eval_every": 10**6, "eval_episodes": 1,
             "log_every": 2, "video_every": 0, "checkpoint_every": 40, "model_lr": 1e30}
    line = assert_cli_error("blast.py", tmp_path, [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()],
                            "error: non-finite losses/", "in the updates logged at frame 50 (update 2); last "
                            "checkpoint: runs/", "/checkpoint.pt", code=3)
    assert glob.glob(str(tmp_path / "runs" / "*" / "events.out.tfevents.*")), line


def test_too_large_buffer_fails_before_anything_is_built_or_created(tmp_path):
    assert_cli_error("blast.py", tmp_path, ["--env-id", "cartpole-balance", "--buffer-size", "100000000"],
                     "--buffer-size 100000000")
    assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("discrete", [False, True])
def test_update_and_acting_create_no_tensor_beside_the_parameters(discrete, one_thread):
    """GPU safety without a GPU: under torch.device("meta") every tensor created without device= lands on meta, and
    an op mixing it with the CPU parameters fails; two updates and a few acting steps must run. Adam creates its
    step counters lazily with torch.tensor(), on the CPU also in a CUDA run (torch's design): one update before the
    meta block creates them."""
    torch.manual_seed(0)
    args = b.Args(**TINY)
    wm, actor, critic, slow_critic, opts = b.make_agent(args, OBS, 2, torch.device("cpu"), discrete)
    data = batch()
    if discrete:
        data["action"] = F.one_hot(data["action"].argmax(-1), 2).float()
    b.update(wm, actor, critic, slow_critic, opts, data, args, 0)
    with torch.device("meta"):
        for u in (1, 2):
            metrics = b.update(wm, actor, critic, slow_critic, opts, data, args, u)
        b.set_mode(False, wm, actor)
        state = b.initial_state(wm, actor, 2, torch.device("cpu"))
        for t, explore in enumerate((True, True, False)):
            action, state = b.policy(wm, actor, state, data["obs"][:2, t], data["is_first"][:2, t], explore)
        b.set_mode(True, wm, actor)
    assert all(v.device.type == "cpu" and torch.isfinite(v) for v in metrics.values())
    assert action.device.type == "cpu" and action.shape == (2, 2)


def test_nan_action_stops_the_run_before_the_simulator_fails(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    args = tiny_main_args(checkpoint_every=0)
    assert_nan_action_stops_the_run(b, args, monkeypatch, capsys)
