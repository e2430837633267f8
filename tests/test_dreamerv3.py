"""Tests of dreamerv3.py: the maths on hand-computed examples, the RSSM resets, a CLI smoke run, determinism."""

import copy
import glob
import json
import math
import os
import shutil
import signal

import numpy as np
import pytest
import torch

import dreamerv3 as d
from smoke import (DREAMER_BAD_INPUTS, DREAMER_TINY, assert_clean_interrupt, assert_cli_error, assert_close_dicts,
                   assert_dreamer_update_and_acting_create_no_tensor_beside_the_parameters, assert_finite_scalars,
                   assert_help_documents_every_hyperparameter, assert_nan_action_stops_the_run,
                   assert_sigterm_writes_a_checkpoint_then_resume_finishes, assert_tracks_offline,
                   cut_the_final_evaluation, dreamer_main_args, eval_checkpoint_cli, events, fill_pixel_replay,
                   kill_after_first_checkpoint, non_finite_loss_run, random_pixel_batch, resume_cli, run_cli,
                   truncated_copy)

TINY = DREAMER_TINY  # the sizes of every tiny run here


def tiny_agent():
    """Args with the TINY sizes, and a world model, continuous actor, critic and slow critic (seed 0)."""
    torch.manual_seed(0)
    a = d.Args(**{k: v for k, v in TINY.items() if k in d.Args.__dataclass_fields__})
    wm = d.WorldModel((3, 16, 16), 2, a.deter, a.stoch, a.classes, a.units, a.mlp_layers, a.cnn_depth, a.unimix, 255)
    feat = a.deter + a.stoch * a.classes
    actor = d.Actor(feat, 2, a.units, 1, False, 0.1, 1.0, 0.01)
    return a, wm, actor, d.Critic(feat, a.units, 1, 255), d.Critic(feat, a.units, 1, 255)


def test_symlog_symexp_inverse():
    x = torch.tensor([-1e4, -3.0, -1e-3, 0.0, 1e-3, 1.0, 50.0, 1e4], dtype=torch.float64)
    torch.testing.assert_close(d.symexp(d.symlog(x)), x)
    torch.testing.assert_close(d.symlog(x), torch.sign(x) * torch.log(x.abs() + 1))
    assert d.symlog(torch.tensor(math.e - 1)).item() == pytest.approx(1.0)


def test_twohot_weights_and_round_trip():
    bins = torch.tensor([-1.0, 0.0, 1.0, 2.0])
    # 0.25 lies a quarter of the way from bin 0 to bin 1: weights 0.75 and 0.25.
    torch.testing.assert_close(d.twohot(torch.tensor(0.25), bins), torch.tensor([0.0, 0.75, 0.25, 0.0]))
    torch.testing.assert_close(d.twohot(torch.tensor(2.0), bins), torch.tensor([0.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(d.twohot(torch.tensor(-7.0), bins), torch.tensor([1.0, 0.0, 0.0, 0.0]))  # clipped
    torch.testing.assert_close(d.twohot(torch.tensor(0.0), bins), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    # Round trip on the real 255 bins: decode(encode(x)) = x inside the symexp range.
    bins = torch.linspace(-20, 20, 255, dtype=torch.float64)
    x = torch.tensor([-1234.5, -1.0, -0.01, 0.0, 0.3, 7.0, 1e5], dtype=torch.float64)
    logits = torch.log(d.twohot(d.symlog(x), bins))
    torch.testing.assert_close(d.twohot_mean(logits, bins), x)
    # Zero logits (the zero-initialised heads) predict 0 and give loss ln(255) for any target.
    zero = torch.zeros(3, 255, dtype=torch.float64)
    torch.testing.assert_close(d.twohot_mean(zero, bins), torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(d.twohot_loss(zero, x[:3], bins), torch.full((3,), math.log(255), dtype=torch.float64))


def test_lambda_return_hand_computed():
    # H = 3, gamma 0.9, lambda 0.5, the episode ends on arriving at s_3 (c_3 = 0):
    # R_2 = 3 + 0 = 3;  R_1 = 2 + 0.9 (0.5 * 2 + 0.5 * 3) = 4.25;  R_0 = 1 + 0.9 (0.5 * 1 + 0.5 * 4.25) = 3.3625
    reward = torch.tensor([[1.0], [2.0], [3.0]])  # r_1..r_3
    value = torch.tensor([[0.5], [1.0], [2.0], [4.0]])  # v_0..v_3
    cont = torch.tensor([[1.0], [1.0], [0.0]])  # c_1..c_3
    ret = d.lambda_return(reward, value, cont, gamma=0.9, lam=0.5)
    torch.testing.assert_close(ret, torch.tensor([[3.3625], [4.25], [3.0]]))
    # lambda = 1 and no ends: the discounted reward sum bootstrapped with gamma^3 v_3.
    ret = d.lambda_return(reward, value, torch.ones(3, 1), gamma=0.9, lam=1.0)
    torch.testing.assert_close(ret[0, 0], torch.tensor(1 + 0.9 * 2 + 0.81 * 3 + 0.729 * 4))
    # lambda = 0: one-step targets r_{t+1} + gamma c_{t+1} v_{t+1}.
    ret = d.lambda_return(reward, value, cont, gamma=0.9, lam=0.0)
    torch.testing.assert_close(ret[:, 0], torch.tensor([1 + 0.9 * 1.0, 2 + 0.9 * 2.0, 3.0]))


def _kl_pair(a):
    """post = [0.5, 0.5], prior = [a, 1 - a] (one latent, two classes): KL = -ln 2 - 0.5 ln(a (1 - a))."""
    post = torch.log(torch.tensor([[[0.5, 0.5]]])).requires_grad_()  # (b, S, K) = (1, 1, 2)
    prior = torch.log(torch.tensor([[[a, 1 - a]]])).requires_grad_()
    return post, prior, -math.log(2) - 0.5 * math.log(a * (1 - a))


def test_kl_free_bits_at_the_clip_boundary():
    for a, expect_grad in ((0.04, False), (0.03, True)):  # KL = 0.937 nats (below 1) and 1.075 nats (above)
        post, prior, kl = _kl_pair(a)
        torch.testing.assert_close(d.categorical_kl(post, prior), torch.tensor([kl]))
        dyn, rep = d.kl_terms(post, prior, free_bits=1.0)
        torch.testing.assert_close(dyn, torch.tensor([max(1.0, kl)]))
        torch.testing.assert_close(rep, torch.tensor([max(1.0, kl)]))
        dyn.sum().backward(retain_graph=True)
        # L_dyn trains only the prior (sg on the posterior), and only above the free bits.
        assert post.grad is None or post.grad.abs().sum() == 0
        assert (prior.grad.abs().sum() > 0) == expect_grad
        prior.grad = None
        rep.sum().backward()
        assert prior.grad is None or prior.grad.abs().sum() == 0  # L_rep trains only the posterior
        assert (post.grad.abs().sum() > 0) == expect_grad


def test_unimix_floor():
    logits = torch.randn(64, 32, 32) * 50  # very peaked categoricals
    probs = d.unimix_logits(logits, 0.01).exp()
    assert probs.min() >= 0.01 / 32 * (1 - 1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(64, 32))
    # The RSSM's priors and posteriors carry the same floor.
    rssm = d.RSSM(deter=8, stoch=32, classes=32, units=8, action_dim=2, embed_dim=4, unimix=0.01)
    assert rssm.prior_logits(torch.randn(5, 8) * 100).exp().min() >= 0.01 / 32 * (1 - 1e-5)
    # Straight-through samples are one-hot in value and carry the gradient of the probabilities.
    logits = torch.randn(10, 4, 6, requires_grad=True)
    sample = d.sample_onehot(logits)
    onehot = torch.nn.functional.one_hot(sample.detach().argmax(-1), 6).float()
    torch.testing.assert_close(sample.detach(), onehot)  # (up to float rounding of + probs - sg(probs))
    (sample * torch.arange(6.0)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_percentile_return_normalisation():
    ret = torch.arange(101.0)  # 5th percentile 5, 95th percentile 95
    norm = d.ReturnNorm(decay=0.5, low_pct=5, high_pct=95, limit=1.0)
    offset, scale = norm(ret)
    torch.testing.assert_close((offset, scale), (torch.tensor(2.5), torch.tensor(45.0)))  # EMAs start at 0
    offset, scale = norm(ret)
    torch.testing.assert_close((offset, scale), (torch.tensor(3.75), torch.tensor(67.5)))
    # Small returns are not scaled up: max(1, S).
    norm = d.ReturnNorm(decay=0.99, low_pct=5, high_pct=95, limit=1.0)
    assert norm(torch.linspace(0, 0.1, 50))[1].item() == 1.0


def test_rssm_resets_at_is_first():
    torch.manual_seed(0)
    rssm = d.RSSM(deter=8, stoch=3, classes=4, units=8, action_dim=2, embed_dim=5, unimix=0.01)
    init_deter, init_stoch = rssm.initial(2)
    deter, stoch, act = torch.randn(2, 8), torch.randn(2, 3, 4), torch.randn(2, 2)
    d2, s2, a2 = rssm.reset(deter, stoch, act, torch.tensor([True, False]))
    torch.testing.assert_close(d2[0], init_deter[0])
    torch.testing.assert_close(s2[0], init_stoch[0])
    assert torch.all(a2[0] == 0)
    torch.testing.assert_close((d2[1], s2[1], a2[1]), (deter[1], stoch[1], act[1]))
    torch.testing.assert_close(init_deter[0], torch.tanh(rssm.h0))
    # In a sequence: two rows that differ before an episode start at t=2 (embeddings and the action a_1
    # that step 2 would consume) have the same h_2 = f(h_0, z_0, 0) there, but differ without the reset.
    embed, action = torch.randn(2, 4, 5), torch.randn(2, 4, 2)
    embed[1, 2:], action[1, 2:] = embed[0, 2:], action[0, 2:]
    is_first = torch.zeros(2, 4, dtype=torch.bool)
    is_first[:, 2] = True
    h = rssm.observe(embed, action, is_first)[0]
    torch.testing.assert_close(h[0, 2], h[1, 2])
    torch.testing.assert_close(h[:, 2], rssm.recurrent(init_deter, init_stoch, torch.zeros(2, 2)))
    assert not torch.allclose(rssm.observe(embed, action, torch.zeros(2, 4, dtype=torch.bool))[0][0, 2], h[1, 2])
    # Step t consumes action[:, t-1]: changing the last action changes nothing, changing a_0 changes h_1.
    a2 = action.clone()
    a2[:, -1] += 1
    torch.manual_seed(1)
    h_a = rssm.observe(embed, action, is_first)[0]
    torch.manual_seed(1)
    torch.testing.assert_close(rssm.observe(embed, a2, is_first)[0], h_a)
    a2[:, 0] += 1
    torch.manual_seed(1)
    assert not torch.allclose(rssm.observe(embed, a2, is_first)[0][:, 1], h_a[:, 1])


def test_discrete_actor_is_unimix_onehot():
    actor = d.Actor(feat_dim=6, action_dim=3, units=8, layers=1, discrete=True, min_std=0.1, max_std=1.0, unimix=0.01)
    action, logp, _ = actor(torch.randn(5, 6) * 100)
    torch.testing.assert_close(action.detach(), torch.nn.functional.one_hot(action.detach().argmax(-1), 3).float())
    assert torch.all(logp(action.detach()) >= math.log(0.01 / 3) - 1e-5)  # the unimix floor


def test_discrete_actor_logp_and_entropy_by_hand():
    # probs = 0.99 softmax(out) + 0.01 / K; log-prob of a one-hot action and entropy from those probs.
    torch.manual_seed(0)
    actor = d.Actor(feat_dim=6, action_dim=3, units=8, layers=1, discrete=True, min_std=0.1, max_std=1.0, unimix=0.01)
    feat = torch.randn(5, 6) * 3
    with torch.no_grad():
        actor.net[-1].weight.normal_(0, 2.0)  # peaked distributions, so that the unimix floor matters
    _, logp, ent = actor(feat)
    probs = 0.99 * torch.softmax(actor.net(feat).double(), -1) + 0.01 / 3
    a = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1, 0]), 3).float()
    torch.testing.assert_close(logp(a).double(), probs.log()[torch.arange(5), a.argmax(-1)])
    torch.testing.assert_close(ent.double(), -(probs * probs.log()).sum(-1))


def _const_head(linear, bins, k):
    """Zero the output weights and put all the mass on bin k: the head predicts symexp(bins[k]) everywhere."""
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        linear.bias[k] = 50.0
    return d.symexp(bins[k]).item()


def _ac_setup(discrete, seed=0):
    torch.manual_seed(seed)
    wm = d.WorldModel((3, 16, 16), 3, 8, 2, 3, 8, 1, 4, 0.01, 255)
    actor = d.Actor(8 + 6, 3, 8, 1, discrete, 0.1, 1.0, 0.01)
    critic, slow = d.Critic(8 + 6, 8, 1, 255), d.Critic(8 + 6, 8, 1, 255)
    deter = torch.randn(2, 8)
    stoch = torch.nn.functional.one_hot(torch.randint(0, 3, (2, 2)), 3).float()
    with torch.no_grad():
        wm.heads["cont"][-1].weight.zero_()
        wm.heads["cont"][-1].bias.fill_(5.0)  # c_1 = c_2 = 1 (the head's mode)
    return wm, actor, critic, slow, deter, stoch


def test_actor_critic_losses_hand_computed_discrete(one_thread):
    """H = 2, constant reward r, continue 1, critic v and slow critic v', uniform discrete actor (log pi = -ln 3).
    R_1 = r + g v, R_0 = r + g ((1 - lam) v + lam R_1); start 0 is terminal (weights 0), start 1 weights [1, g]."""
    g, lam, eta, reg = 0.9, 0.5, 0.1, 1.0
    wm, actor, critic, slow, deter, stoch = _ac_setup(discrete=True)
    bins = wm.bins
    r = _const_head(wm.heads["reward"][-1], bins, 140)
    v = _const_head(critic.net[-1], bins, 120)
    vs = _const_head(slow.net[-1], bins, 130)
    with torch.no_grad():
        actor.net[-1].weight.zero_()
        actor.net[-1].bias.zero_()
    is_terminal = torch.tensor([True, False])
    torch.manual_seed(1)
    actor_loss, critic_loss, metrics = d.actor_critic_loss(wm, actor, critic, slow, d.ReturnNorm(0.99, 5, 95, 1.0),
                                                           deter, stoch, is_terminal, 2, g, lam, eta, reg)
    R1 = r + g * v
    R0 = r + g * ((1 - lam) * v + lam * R1)
    assert metrics["stats/return_scale"].item() == 1.0  # EMAs start at 0: 0.01 (P95 - P5) < 1
    w = torch.tensor([[0.0, 1.0], [0.0, g]])  # (H, N)
    adv = torch.tensor([R0 - v, R1 - v])[:, None]
    # REINFORCE: -ln pi(a_t) sg(A_t) - eta H[pi], ln pi = -ln 3 and H = ln 3 for every action
    expected = ((math.log(3) * adv - eta * math.log(3)) * w).mean()
    assert actor_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    logits = critic.net[-1].bias
    nll = lambda x: d.twohot_loss(logits, torch.tensor(x), bins).item()  # noqa: E731
    expected = ((torch.tensor([nll(R0), nll(R1)])[:, None] + reg * nll(vs)) * w).mean()
    assert critic_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_continuous_actor_gradient_through_the_dynamics(one_thread):
    """Entropy scale 0, non-constant critic: the actor's gradient is that of -(R_t - v_t) w_t, where R_t and v_t
    depend on the actions through img_step and the critic (R_t by the H = 2 formulas, written out)."""
    g, lam = 0.9, 0.5
    wm, actor, critic, slow, deter, stoch = _ac_setup(discrete=False)
    with torch.no_grad():
        critic.net[-1].weight.normal_(0, 0.5)
        wm.heads["reward"][-1].weight.normal_(0, 0.5)
    is_terminal = torch.tensor([False, True])
    torch.manual_seed(1)
    actor_loss, _, metrics = d.actor_critic_loss(wm, actor, critic, slow, d.ReturnNorm(0.99, 5, 95, 1.0),
                                                 deter, stoch, is_terminal, 2, g, lam, 0.0, 1.0)
    assert metrics["stats/return_scale"].item() == 1.0
    grads = torch.autograd.grad(actor_loss, list(actor.parameters()))
    torch.manual_seed(1)  # the same action and latent samples
    h, z, feats = deter, stoch, [d.feature(deter, stoch)]
    for _ in range(2):
        a = actor(feats[-1].detach())[0]
        h, z = wm.rssm.img_step(h, z, a)
        feats.append(d.feature(h, z))
    f = torch.stack(feats)
    rew = d.twohot_mean(wm.heads["reward"](f[1:]), wm.bins)  # r_1, r_2
    val = d.twohot_mean(critic(f), critic.bins)  # v_0, v_1, v_2
    R1 = rew[1] + g * val[2]
    R0 = rew[0] + g * ((1 - lam) * val[1] + lam * R1)
    w = torch.tensor([[1.0, 0.0], [g, 0.0]])
    expected = (-torch.stack([R0 - val[0], R1 - val[1]]) * w).mean()
    torch.testing.assert_close(actor_loss, expected)
    for got, want in zip(grads, torch.autograd.grad(expected, list(actor.parameters()))):
        torch.testing.assert_close(got, want)
    assert sum(p.abs().sum() for p in grads) > 0


def test_behaviour_update_leaves_world_model_grads_and_slow_critic_is_ema(one_thread):
    a, wm, actor, critic, slow = tiny_agent()
    with torch.no_grad():
        slow.net[-1].bias.normal_()  # slow != critic before the update
    opts = tuple(torch.optim.Adam(m.parameters(), lr=1e-3) for m in (wm, actor, critic))
    snapshot = {}
    step = opts[0].step

    def wm_step(*args, **kw):  # the world model's grads when its optimiser steps
        snapshot.update({n: p.grad.clone() for n, p in wm.named_parameters() if p.grad is not None})
        return step(*args, **kw)

    opts[0].step = wm_step
    B, T = 2, 4
    data = dict(obs=torch.randint(0, 256, (B, T, 3, 16, 16), dtype=torch.uint8), action=torch.rand(B, T, 2) * 2 - 1,
                reward=torch.randn(B, T), is_first=torch.zeros(B, T, dtype=torch.bool),
                is_terminal=torch.zeros(B, T, dtype=torch.bool))
    old = [p.clone() for p in slow.parameters()]
    d.update(wm, actor, critic, slow, d.ReturnNorm(0.99, 5, 95, 1.0), opts, data, a)
    assert snapshot
    for n, p in wm.named_parameters():  # the actor and critic backward passes added nothing
        assert (p.grad is None) if n not in snapshot else torch.equal(p.grad, snapshot[n]), n
    # Slow critic: v' <- 0.98 v' + 0.02 v after the critic's step
    assert a.critic_ema_decay == 0.98
    for p_slow, p_old, p in zip(slow.parameters(), old, critic.parameters()):
        torch.testing.assert_close(p_slow, 0.98 * p_old + 0.02 * p)


@pytest.mark.parametrize("make", [lambda: torch.nn.Linear(600, 400),
                                  lambda: torch.nn.ConvTranspose2d(32, 16, 4, stride=2)])
def test_init_weights_truncated_normal_fan_avg(make):
    torch.manual_seed(0)
    layer = make()
    d.init_weights(layer)
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(layer.weight)
    sigma = (2.0 / (fan_in + fan_out)) ** 0.5  # the std after truncation (variance scaling, fan_avg)
    w = layer.weight.detach()
    # truncated at +-2 of the untruncated normal's std (sigma / 0.8796)
    assert w.abs().max().item() <= 2 * sigma / 0.87962566103423978 + 1e-7
    assert w.abs().max().item() > 1.9 * sigma / 0.87962566103423978
    assert w.std().item() == pytest.approx(sigma, rel=0.02)
    assert torch.all(layer.bias == 0)


def test_one_update_is_finite_and_trains_every_network(one_thread):
    a, wm, actor, critic, slow = tiny_agent()
    slow.load_state_dict(critic.state_dict())
    opts = tuple(torch.optim.Adam(m.parameters(), lr=1e-3) for m in (wm, actor, critic))
    B, T = 3, 6
    data = dict(obs=torch.randint(0, 256, (B, T, 3, 16, 16), dtype=torch.uint8), action=torch.rand(B, T, 2) * 2 - 1,
                reward=torch.randn(B, T), is_first=torch.rand(B, T) < 0.2, is_terminal=torch.rand(B, T) < 0.1)
    nets = {"wm": wm, "actor": actor, "critic": critic}
    before = {f"{k}.{n}": p.clone() for k, net in nets.items() for n, p in net.named_parameters()}
    m = d.update(wm, actor, critic, slow, d.ReturnNorm(0.99, 5, 95, 1.0), opts, data, a)
    assert all(torch.isfinite(v) for v in m.values())
    # The raw KL is logged before the free-bits clip (a fresh model sits mostly below 1 nat; the clipped loss >= 1).
    assert 0 < m["stats/kl"].item() < m["losses/kl_dyn"].item() and m["losses/kl_dyn"].item() >= 1.0
    # The first reward loss is ln(255): the zero-initialised output layer predicts uniform bins.
    assert m["losses/reward"].item() == pytest.approx(math.log(255), rel=1e-5)
    after = {f"{k}.{n}": p for k, net in nets.items() for n, p in net.named_parameters()}
    unchanged = {n for n in before if torch.equal(before[n], after[n])}
    # Every parameter moves except the hidden layers behind the zero-initialised outputs (no gradient yet).
    assert unchanged == {"wm.heads.reward.0.weight", "wm.heads.reward.1.weight", "wm.heads.reward.1.bias",
                         "critic.net.0.weight", "critic.net.1.weight", "critic.net.1.bias"}
    assert all(p.requires_grad for p in wm.parameters())  # restored after the behaviour update


def test_bf16_update_stays_close_to_float32(one_thread):
    """--precision bf16: the same update from the same state and RNG gives losses within 2% of float32 (bf16 keeps 8
    bits of mantissa, ~0.4% per rounding), every metric and parameter stays float32, and the update is finite."""
    a, wm, actor, critic, slow = tiny_agent()
    slow.load_state_dict(critic.state_dict())
    B, T = 3, 6
    g = torch.Generator().manual_seed(1)
    data = random_pixel_batch(B, T, g)
    out = {}
    for precision in ("fp32", "bf16"):
        nets = [copy.deepcopy(m) for m in (wm, actor, critic, slow)]
        opts = tuple(torch.optim.Adam(m.parameters(), lr=1e-3) for m in nets[:3])
        a.precision = precision
        torch.manual_seed(0)
        out[precision] = d.update(*nets, d.ReturnNorm(0.99, 5, 95, 1.0), opts, data, a)
        assert all(p.dtype == torch.float32 for m in nets for p in m.parameters())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out["bf16"].values())
    for k in ("losses/world_model", "losses/image", "losses/reward", "losses/kl_dyn", "stats/kl",
              "stats/imagined_return"):
        assert out["bf16"][k].item() == pytest.approx(out["fp32"][k].item(), rel=2e-2, abs=1e-3), k
    assert out["bf16"]["losses/image"].item() != out["fp32"]["losses/image"].item()  # bf16 did run


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="inductor on a CPU needs a C++ compiler")
def test_compiled_update_equals_eager(one_thread, inductor_fallback_random, monkeypatch):
    """--compile: two compiled updates from the same state and RNG give the eager losses and parameters within
    float32 tolerance (inductor reorders sums; its random numbers are switched to eager's for the comparison).
    The one inductor compile in the default run (about 100 s cold on 2 cores); the other scripts' tests use
    aot_eager there and inductor under `-m slow`."""
    monkeypatch.setattr(d, "COMPILED", {})  # compiled afresh for these tiny shapes
    a, wm, actor, critic, slow = tiny_agent()
    slow.load_state_dict(critic.state_dict())
    B, T = 2, 4
    g = torch.Generator().manual_seed(1)
    batches = [random_pixel_batch(B, T, g) for _ in range(2)]
    out, params = {}, {}
    for compile in (False, True):
        nets = [copy.deepcopy(m) for m in (wm, actor, critic, slow)]
        opts = tuple(torch.optim.Adam(m.parameters(), lr=1e-3) for m in nets[:3])
        a.compile = compile
        torch.manual_seed(0)
        out[compile] = [d.update(*nets, d.ReturnNorm(0.99, 5, 95, 1.0), opts, data, a) for data in batches]
        params[compile] = torch.cat([p.detach().flatten() for m in nets for p in m.parameters()])
    assert len(d.COMPILED) == 1  # the compiled functions were used (and made once)
    for eager, compiled in zip(out[False], out[True]):
        assert_close_dicts(compiled, eager)
    torch.testing.assert_close(params[True], params[False], rtol=1e-4, atol=1e-5)
    assert not torch.equal(params[True], torch.cat([p.detach().flatten() for m in (wm, actor, critic, slow)
                                                     for p in m.parameters()]))  # the updates did train


@pytest.mark.parametrize("argv, needles", DREAMER_BAD_INPUTS)
def test_bad_input_is_one_line_naming_the_flag(tmp_path, argv, needles):
    assert_cli_error("dreamerv3.py", tmp_path, argv, *needles)
    assert not (tmp_path / "runs").exists()  # refused before anything was built or created


def test_sigint_stops_cleanly_with_events_written(tmp_path):
    flags = {**TINY, "env_id": "cartpole-balance", "num_envs": 2, "total_timesteps": 100_000, "eval_every": 10**6,
             "eval_episodes": 1, "log_every": 40, "video_every": 0}
    assert_clean_interrupt("dreamerv3.py", tmp_path, flags, signal.SIGINT)
    line = open(tmp_path / "err.txt").read().strip()
    assert "; checkpoint written: --resume runs/" in line  # no periodic checkpoint yet: the interrupt wrote one
    assert glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))


def test_sigterm_before_the_first_checkpoint_writes_one_then_resume_finishes(tmp_path):
    flags = {**TINY, "env_id": "cartpole-balance", "num_envs": 1, "total_timesteps": 300, "eval_every": 10**6,
             "eval_episodes": 1, "log_every": 40, "video_every": 0, "checkpoint_every": 10**6}
    assert_sigterm_writes_a_checkpoint_then_resume_finishes("dreamerv3.py", tmp_path, flags,
                                                            then_without_checkpoints=True)


def test_resume_of_a_run_cut_in_its_final_evaluation_evaluates_then_finishes(tmp_path, monkeypatch, one_thread):
    """An evaluation cut by an interrupt runs again after --resume: here the final one, with the frames done."""
    monkeypatch.chdir(tmp_path)
    run_dir, loop = cut_the_final_evaluation(d, dreamer_main_args(d), monkeypatch)
    assert loop["global_step"] == 80
    out = d.main(dreamer_main_args(d, resume=str(tmp_path / run_dir)))
    assert out["global_step"] == 80 and math.isfinite(out["final_eval_return"]) and len(out["eval_returns"]) == 1


@pytest.mark.parametrize("discrete", [False, True])
def test_update_and_acting_create_no_tensor_beside_the_parameters(discrete, one_thread):
    a = d.Args(**{k: v for k, v in TINY.items() if k in d.Args.__dataclass_fields__})
    data = random_pixel_batch(2, 4, torch.Generator().manual_seed(0))
    assert_dreamer_update_and_acting_create_no_tensor_beside_the_parameters(d, a, data, discrete)


def test_track_writes_an_offline_wandb_run(tmp_path):
    flags = {**TINY, "env_id": "cartpole-balance", "num_envs": 1, "total_timesteps": 80, "eval_every": 80,
             "eval_episodes": 1, "log_every": 40, "video_every": 0, "time_limit": 40}
    assert_tracks_offline("dreamerv3.py", tmp_path, flags)


def test_smoke_cli(tmp_path):
    """The real command line with a tiny model: final JSON line, finite losses, events, video, checkpoint."""
    flags = {**TINY, "env_id": "cartpole-balance", "num_envs": 1, "total_timesteps": 240, "eval_every": 160,
             "eval_episodes": 2, "log_every": 80, "video_every": 160}
    final, run_dir, ea = run_cli("dreamerv3.py", tmp_path, flags, ("--capture-video", "--save-model"))
    assert math.isfinite(final["final_eval_return"]) and len(final["eval_returns"]) == 2
    assert final["updates"] > 10
    assert_finite_scalars(ea, (
        "losses/image", "losses/reward", "losses/cont", "losses/kl_dyn", "losses/kl_rep", "stats/kl", "losses/actor",
        "losses/critic", "eval/episodic_return", "charts/episodic_return", "charts/SPS"))
    assert {"openloop", "eval/video"} <= set(ea.Tags()["images"])
    videos = sorted(glob.glob(os.path.join(run_dir, "videos", "eval_*.mp4")))
    assert [os.path.basename(v) for v in videos] == ["eval_160.mp4", "eval_240.mp4"]
    import av

    with av.open(videos[-1]) as c:  # a 256x256 picture of the evaluation episode that people can watch
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    assert frames[0].shape == (256, 256, 3) and len(frames) > 10
    ckpt = torch.load(os.path.join(run_dir, "dreamerv3.pt"), weights_only=True)
    assert {"wm", "actor", "critic", "slow_critic", "return_norm"} == set(ckpt["nets"]) and len(ckpt["opts"]) == 3
    assert ckpt["loop"]["global_step"] == 240 and ckpt["args"]["env_id"] == "cartpole-balance"


def test_resume_and_eval_checkpoint_cli(tmp_path):
    """A finished run continues with a larger --total-timesteps from its end-of-run checkpoint (replay files kept,
    counters continued, no temporary file left); --eval-checkpoint prints its JSON line; bad checkpoints and
    changed model flags give one error line."""
    import subprocess
    import sys

    from smoke import ROOT

    flags = {**TINY, "env_id": "cartpole-balance", "num_envs": 1, "total_timesteps": 160, "eval_every": 1000,
             "eval_episodes": 1, "log_every": 80, "video_every": 0, "time_limit": 40}
    final, run_dir, _ = run_cli("dreamerv3.py", tmp_path, flags)
    obs_before = np.fromfile(os.path.join(run_dir, "replay", "obs.bin"), np.uint8)
    ck = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    rows = ck["replay"]["count"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    script = os.path.join(ROOT, "dreamerv3.py")
    out = subprocess.run([sys.executable, script, "--resume", final["run_dir"], "--total-timesteps", "240",
                          "--precision", "bf16", "--compile", "--compile-backend", "aot_eager"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # (the CLI with both
    assert out.returncode == 0, out.stderr[-2000:]  # switches: a resumed run may change them)
    assert f"resumed {final['run_dir']} at frame 160 after {final['updates']} updates" in out.stdout
    assert "resumed at frame 160" in out.stdout and "prefilling" not in out.stdout  # the cost: line
    assert "compiling the update (--compile)" in out.stdout and "compiled the update in" in out.stdout
    resumed = json.loads(out.stdout.strip().splitlines()[-1])
    assert resumed["global_step"] == 240 and resumed["updates"] > final["updates"]
    obs_after = np.fromfile(os.path.join(run_dir, "replay", "obs.bin"), np.uint8).reshape(1, -1, 3, 64, 64)
    np.testing.assert_array_equal(obs_after[:, :rows], obs_before.reshape(1, -1, 3, 64, 64)[:, :rows])
    assert not glob.glob(os.path.join(run_dir, "*.tmp"))
    ev = eval_checkpoint_cli("dreamerv3.py", tmp_path, os.path.join(final["run_dir"], "checkpoint.pt"),
                             "--eval-episodes", "1")
    assert ev["global_step"] == 240 and len(ev["eval_returns"]) == 1 and math.isfinite(ev["eval_return"])
    # bad input: a changed model flag, a corrupt file, a missing run dir, a run that is already that long
    assert_cli_error("dreamerv3.py", tmp_path, ["--resume", final["run_dir"], "--total-timesteps", "400",
                                                "--deter", "32"], "--deter 32", "checkpoint")
    again = resume_cli("dreamerv3.py", tmp_path, final["run_dir"], "--total-timesteps", "200")  # a finished run
    assert again["final"] == resumed and again["stdout"].strip() == json.dumps(resumed)  # prints its line, no more
    assert_cli_error("dreamerv3.py", tmp_path, ["--resume", "no/such/dir"], "--resume", "no/such/dir")
    bad = truncated_copy(os.path.join(run_dir, "checkpoint.pt"), tmp_path / "bad.pt")
    assert_cli_error("dreamerv3.py", tmp_path, ["--eval-checkpoint", str(bad)], "truncated or corrupt", "bad.pt")


def test_update_after_restore_equals_the_uninterrupted_update(tmp_path, one_thread):
    """Save after two updates, make a third; a fresh agent (other init) restored from the checkpoint, with the
    replay reopened from its files, draws the same batch and makes exactly the same third update."""
    from common.replay import ReplayBuffer

    a = d.Args(**{k: v for k, v in TINY.items() if k in d.Args.__dataclass_fields__})
    B, T, N, shape = a.batch_size, a.batch_length, 2, (3, 64, 64)
    rng = np.random.default_rng(0)

    def agent(seed):
        torch.manual_seed(seed)
        nets, opts = d.build_agent(a, shape, 1, False, torch.device("cpu"))
        return nets, opts, ReplayBuffer(200, N, shape, 1, seed=a.seed, path=str(tmp_path / "replay"),
                                        resume=seed != 0)

    def step(nets, opts, replay):
        data = {k: torch.as_tensor(v) for k, v in replay.sample(B, T).items()}
        return d.update(*nets.values(), opts, data, a)

    nets, opts, replay = agent(0)
    fill_pixel_replay(replay, 40, rng)
    for _ in range(2):
        step(nets, opts, replay)
    path = str(tmp_path / "checkpoint.pt")
    d.save_checkpoint(path, a, nets, opts, {"global_step": 80}, replay)
    m1 = step(nets, opts, replay)
    nets2, opts2, replay2 = agent(1)
    assert not torch.equal(nets2["wm"].encoder.net[0].weight, nets["wm"].encoder.net[0].weight)
    assert d.restore_checkpoint(d.load_checkpoint(path, "--resume"), nets2, opts2, replay2) == {"global_step": 80}
    m2 = step(nets2, opts2, replay2)
    assert {k: v.item() for k, v in m1.items()} == {k: v.item() for k, v in m2.items()}
    for k in nets:
        for (n, p), p2 in zip(nets[k].state_dict().items(), nets2[k].state_dict().values()):
            assert torch.equal(p, p2), (k, n)
    for o, o2 in zip(opts, opts2):
        s1, s2 = o.state_dict()["state"], o2.state_dict()["state"]
        assert all(torch.equal(s1[i][j], s2[i][j]) for i in s1 for j in s1[i])


def test_sigkill_after_first_checkpoint_then_resume(tmp_path):
    """SIGKILL right after the first checkpoint appears; --resume continues from the checkpoint's frame to the
    final JSON line, with the replay rows written before the checkpoint intact and no temporary file left."""
    flags = {**TINY, "env_id": "cartpole-balance", "num_envs": 1, "total_timesteps": 400, "eval_every": 10**6,
             "eval_episodes": 1, "log_every": 80, "video_every": 0, "time_limit": 40, "checkpoint_every": 120}
    run_dir, ck = kill_after_first_checkpoint("dreamerv3.py", tmp_path, flags)
    saved, rows = ck["loop"]["global_step"], ck["replay"]["count"]
    assert 120 <= saved < 400 and rows > 0
    before = np.fromfile(os.path.join(run_dir, "replay", "obs.bin"), np.uint8).reshape(1, -1, 3, 64, 64)[:, :rows]
    out = resume_cli("dreamerv3.py", tmp_path, run_dir)
    assert f"at frame {saved} after {ck['loop']['updates']} updates" in out["stdout"]
    assert out["final"]["global_step"] == 400 and out["final"]["updates"] > ck["loop"]["updates"]
    after = np.fromfile(os.path.join(run_dir, "replay", "obs.bin"), np.uint8).reshape(1, -1, 3, 64, 64)[:, :rows]
    np.testing.assert_array_equal(after, before)
    assert not glob.glob(os.path.join(run_dir, "*.tmp")) and not glob.glob(os.path.join(run_dir, "replay", "*.tmp"))
    steps = [e.step for e in events(run_dir).Scalars("charts/SPS")]
    assert steps == sorted(set(steps)), steps  # TensorBoard continues without duplicated points


def test_same_seed_same_losses(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    args = dreamer_main_args(d, log_every=80)
    first, second = d.main(args), d.main(args)
    assert first["updates"] > 0 and first["losses"]
    assert first["losses"] == second["losses"]


def test_replay_rows_and_acting_resets_follow_the_alignment_convention(tmp_path, monkeypatch, one_thread):
    """With NEXT_STEP autoreset the obs AFTER an episode's last one is first (reward 0), in replay and when acting."""
    monkeypatch.chdir(tmp_path)
    rows, acted = [], []
    policy = d.policy

    class Recorder(d.ReplayBuffer):
        def add(self, obs, action, reward, is_first, is_terminal):
            rows.append((float(reward[0]), bool(is_first[0])))
            super().add(obs, action, reward, is_first, is_terminal)

    def recording_policy(wm, actor, state, obs, is_first):
        acted.append(bool(is_first[0]))
        return policy(wm, actor, state, obs, is_first)

    monkeypatch.setattr(d, "ReplayBuffer", Recorder)
    monkeypatch.setattr(d, "policy", recording_policy)
    args = dreamer_main_args(d, time_limit=20, log_every=80)
    d.main(args)
    firsts = [i for i, (_, first) in enumerate(rows) if first]
    assert firsts == list(range(0, len(rows), 20 // 2 + 1))  # 10 steps, then the reset obs
    assert all(rows[i][0] == 0 for i in firsts) and all(r > 0 for i, (r, _) in enumerate(rows) if i not in firsts)
    evaluation = acted[-10:]  # the final evaluation: one episode of 10 agent steps
    assert evaluation[0] and not any(evaluation[1:])


def test_help_documents_every_hyperparameter(capsys):
    assert_help_documents_every_hyperparameter(d.Args, capsys, (
        "Table 5: 1e-4", "Table 5: 16", "Table 5, DMC: 512", "DreamerV3 2023: 0.5", "Table 5: 3e-4"))


def test_non_finite_loss_stops_the_run(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    err = non_finite_loss_run(d, dreamer_main_args(d), "losses/reward", monkeypatch, capsys)
    assert len(err) == 1 and err[0].startswith(
        "error: non-finite losses/reward = nan in the updates logged at frame 40 (update ")
    assert err[0].endswith("; last checkpoint: none"), err


def test_nan_action_stops_the_run_before_the_simulator_fails(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    assert_nan_action_stops_the_run(d, dreamer_main_args(d), monkeypatch, capsys)
