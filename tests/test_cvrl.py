"""Tests of cvrl.py: the paper's equations on hand-computed examples, gradient paths (Dreamer actor, SAC, MPC),
every Table 2 switch, a CLI smoke run, determinism, --help, bad input, the progress line, Ctrl-C and --track."""

import dataclasses
import glob
import math
import os
import json
import signal

import numpy as np
import pytest
import torch

import cvrl as c
from smoke import (assert_clean_interrupt, assert_cli_error, assert_close_dicts, assert_finite_scalars,
                   assert_help_documents_every_hyperparameter, assert_interrupt_wrote_no_checkpoint,
                   assert_nan_action_stops_the_run, assert_progress_shows,
                   assert_sigterm_writes_a_checkpoint_then_resume_finishes, assert_tracks_offline,
                   cut_the_final_evaluation, eval_checkpoint_cli, events, kill_after_first_checkpoint,
                   non_finite_loss_run, progress_after_a_fast_phase, resume_cli, run_cli, truncated_copy)

TINY = dict(stoch=4, deter=16, hidden=16, units=16, cnn_depth=4, proj_dim=16, reward_layers=1, value_layers=1,
            actor_layers=1, batch_size=2, batch_length=8, imag_horizon=3, buffer_size=2000, time_limit=60,
            prefill=100, pretrain=3, train_every=50, train_steps=2)
OBS = (3, 64, 64)  # the encoder's valid convolutions need 64x64 frames


def tiny_build(seed=0, **overrides):
    torch.manual_seed(seed)
    args = c.Args(**{**TINY, **overrides})
    agent, opts, mpc = c.build_agent(args, OBS, 2, torch.device("cpu"))
    return args, agent, opts, mpc


def batch(B=2, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = dict(obs=torch.randint(0, 256, (B, T, *OBS), dtype=torch.uint8, generator=g),
                action=torch.rand(B, T, 2, generator=g) * 2 - 1, reward=torch.rand(B, T, generator=g),
                is_first=torch.zeros(B, T, dtype=torch.bool), is_terminal=torch.zeros(B, T, dtype=torch.bool))
    data["is_first"][:, 0] = True
    data["is_first"][1, 3] = True
    return data


# --- CELBO -------------------------------------------------------------------------------------
# 3 states s' and 3 observations z in 2-d, W not symmetric (so a transposed W gives other numbers):
# W s'_1 = (2, 0), W s'_2 = (1, 1), W s'_3 = (3, 1); logits [i, j] = z_j . W s'_i
S3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
Z3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
W3 = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
E = math.e
NCE3 = [2 - math.log(E ** 2 + 1 + E ** 2),  # logits of state 1: [2, 0, 2]
        1 - math.log(E + E + E ** 2),  # state 2: [1, 1, 2]
        4 - math.log(E ** 3 + E + E ** 4)]  # state 3: [3, 1, 4]


def test_info_nce_hand_example():
    torch.testing.assert_close(c.info_nce(S3, Z3, W3), torch.tensor(NCE3))
    assert not torch.allclose(c.info_nce(S3, Z3, W3.T), torch.tensor(NCE3))
    # Equal logits: every term is -ln N (the bound is 0); a dominating diagonal drives the loss to its minimum 0.
    torch.testing.assert_close(c.info_nce(torch.zeros(4, 2), torch.randn(4, 2), torch.eye(2)),
                               torch.full((4,), -math.log(4)))
    eye = torch.eye(3)
    losses = [-c.info_nce(eye, eye, k * torch.eye(3)).mean().item() for k in (0.0, 1.0, 5.0, 50.0)]
    assert losses[0] == pytest.approx(math.log(3)) and losses == sorted(losses, reverse=True)
    assert 0 <= losses[-1] < 1e-12
    # float32 logits even for half inputs, and stable for huge scores
    assert torch.isfinite(c.info_nce(1e4 * eye.half(), eye.half(), torch.eye(3).half())).all()


def _identity_critic():
    critic = c.ContrastiveCritic(embed_dim=2, feat_dim=2, proj_dim=2)
    with torch.no_grad():
        for lin in (critic.obs_proj[0], critic.state_proj[0]):
            lin.weight.copy_(torch.eye(2)), lin.bias.zero_()
        critic.W.copy_(W3)
    return critic  # ELU(x) = x for the non-negative inputs below


def test_contrastive_negatives_are_all_batch_observations_including_the_same_sequence():
    critic = _identity_critic()
    # One sequence of 3 steps: the negatives of each state are the OTHER TIME STEPS of its own sequence.
    torch.testing.assert_close(critic(S3[None], Z3[None]), torch.tensor([NCE3]))
    # Three sequences of 1 step: the negatives are the other sequences; same pairs, same numbers.
    torch.testing.assert_close(critic(S3[:, None], Z3[:, None]), torch.tensor(NCE3)[:, None])
    # B = 2, T = 2: each state sees all 4 observations.
    s4, z4 = torch.rand(2, 2, 2), torch.rand(2, 2, 2)
    logits = (s4.reshape(4, 2) @ W3.T) @ z4.reshape(4, 2).T
    torch.testing.assert_close(critic(s4, z4).flatten(), logits.diagonal() - torch.logsumexp(logits, 1))


def test_world_model_loss_terms_and_free_nats(one_thread):
    args, agent, _, _ = tiny_build()
    wm, data = agent.wm, batch()
    loss, m, _ = c.world_model_loss(wm, data, free_nats=3.0, kl_scale=1.0)
    assert {"losses/infonce", "losses/reward", "losses/kl"} <= set(m) and "losses/image" not in m
    # CELBO = -InfoNCE + reward NLL + max(KL, 3): the KL of the tiny model is below 3 nats here
    assert m["losses/kl"].item() < 3.0
    torch.testing.assert_close(loss.detach(), m["losses/infonce"] + m["losses/reward"] + 3.0)
    # free nats act on the batch-mean KL (not per (b, t)): just above the mean the prior (img_out, reached only
    # by the KL) gets no gradient, although some (b, t) terms exceed it; just below the mean it does
    torch.manual_seed(1)
    kl = c.world_model_loss(wm, data, 3.0, 1.0)[1]["losses/kl"].item()
    for free_nats, expect in ((kl + 1e-3, False), (kl - 1e-3, True)):
        wm.zero_grad()
        torch.manual_seed(1)
        c.world_model_loss(wm, data, free_nats, 1.0)[0].backward()
        assert (sum(p.grad.abs().sum() for p in wm.rssm.img_out.parameters()) > 0) == expect
    # the closed-form Gaussian KL matches torch's
    q, p = (torch.randn(5, 3), torch.rand(5, 3) + 0.1), (torch.randn(5, 3), torch.rand(5, 3) + 0.1)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(*q), torch.distributions.Normal(*p)).sum(-1)
    torch.testing.assert_close(c.gaussian_kl(q, p), ref)


def test_rssm_resets_at_is_first_and_consumes_the_previous_action():
    torch.manual_seed(0)
    rssm = c.RSSM(stoch=3, deter=5, hidden=6, action_dim=2, embed_dim=4, min_std=0.1)
    embed, action = torch.randn(2, 4, 4), torch.randn(2, 4, 2)
    is_first = torch.zeros(2, 4, dtype=torch.bool)
    is_first[:, 2] = True
    h = rssm.observe(embed, action, is_first)[0]
    zero = rssm.gru(rssm.img_in(torch.zeros(2, 5)), torch.zeros(2, 5))  # h from the zero state AND zero action
    torch.testing.assert_close(h[:, 2], zero)
    torch.testing.assert_close(h[:, 0], zero)  # every batch starts from the zero state (Dreamer v1)
    assert not torch.allclose(rssm.observe(embed, action, torch.zeros_like(is_first))[0][:, 2], zero)
    # row t consumes action[:, t-1]: the last action changes nothing, a_0 changes h_1
    torch.manual_seed(1)
    ref = rssm.observe(embed, action, is_first)[0]
    a2 = action.clone()
    a2[:, -1] += 1
    torch.manual_seed(1)
    torch.testing.assert_close(rssm.observe(embed, a2, is_first)[0], ref)
    a2[:, 0] += 1
    torch.manual_seed(1)
    assert not torch.allclose(rssm.observe(embed, a2, is_first)[0][:, 1], ref[:, 1])


# --- Behaviour ---------------------------------------------------------------------------------
def a2_value(r, v, gamma, lam, tau):
    """CVRL A.2 written out: V_N^k = sum_{n=tau}^{h-1} g^{n-tau} r_n + g^{h-tau} v_h, h = min(tau + k, H);
    V_lambda = (1 - lam) sum_{n=1}^{H-1} lam^{n-1} V_N^n + lam^{H-1} V_N^H."""
    H = len(r)

    def vn(k):
        h = min(tau + k, H)
        return sum(gamma ** (n - tau) * r[n] for n in range(tau, h)) + gamma ** (h - tau) * v[h]

    return (1 - lam) * sum(lam ** (n - 1) * vn(n) for n in range(1, H)) + lam ** (H - 1) * vn(H)


def test_lambda_return_is_appendix_a2():
    r, v, g, lam = [1.0, 2.0, 3.0], [0.5, 1.0, 2.0, 4.0], 0.9, 0.5
    ret = c.lambda_return(torch.tensor(r)[:, None], torch.tensor(v)[:, None], g, lam)[:, 0]
    # by hand: R_2 = 3 + .9 * 4 = 6.6; R_1 = 2 + .9 (.5 * 2 + .5 * 6.6) = 5.87; R_0 = 1 + .9 (.5 * 1 + .5 * 5.87)
    torch.testing.assert_close(ret, torch.tensor([4.0915, 5.87, 6.6]))
    torch.testing.assert_close(ret, torch.tensor([a2_value(r, v, g, lam, t) for t in range(3)]))
    # lambda = 1: discounted Monte Carlo return bootstrapped with gamma^3 v_3; lambda = 0: one-step targets
    assert c.lambda_return(torch.tensor(r)[:, None], torch.tensor(v)[:, None], g, 1.0)[0, 0].item() == \
        pytest.approx(1 + 0.9 * 2 + 0.81 * 3 + 0.729 * 4)
    torch.testing.assert_close(c.lambda_return(torch.tensor(r)[:, None], torch.tensor(v)[:, None], g, 0.0)[:, 0],
                               torch.tensor([1 + 0.9 * 1.0, 2 + 0.9 * 2.0, 3 + 0.9 * 4.0]))


def test_tanh_gaussian_log_prob_and_actor_init():
    # a = tanh(u): log N(u; m, s) - log(1 - tanh(u)^2); at u = m = 0, s = 1: -ln(2 pi) / 2 per dimension
    assert c.tanh_normal_log_prob(torch.zeros(2), torch.zeros(2), torch.ones(2)).item() == \
        pytest.approx(-math.log(2 * math.pi))
    u = torch.tensor([0.5])
    expect = -0.5 * 0.25 - 0.5 * math.log(2 * math.pi) - math.log(1 - math.tanh(0.5) ** 2)
    assert c.tanh_normal_log_prob(u, torch.zeros(1), torch.ones(1)).item() == pytest.approx(expect)
    mean, std = torch.randn(6, 3), torch.rand(6, 3) + 0.2
    u = mean + std * torch.randn(6, 3)
    ref = torch.distributions.TransformedDistribution(torch.distributions.Normal(mean, std),
                                                      torch.distributions.TanhTransform())
    torch.testing.assert_close(c.tanh_normal_log_prob(u, mean, std), ref.log_prob(torch.tanh(u)).sum(-1),
                               rtol=1e-4, atol=1e-4)
    # Dreamer v1's tanh_normal: zero output -> std 5 + 1e-4; the pre-tanh mean stays within +-5
    actor = c.Actor(4, 3, 8, 1, mean_scale=5.0, init_std=5.0, min_std=1e-4)
    with torch.no_grad():
        actor.net[-1].weight.zero_(), actor.net[-1].bias.zero_()
    m0, s0 = actor.dist(torch.randn(2, 4))
    torch.testing.assert_close(s0, torch.full((2, 3), 5.0 + 1e-4)) and torch.testing.assert_close(m0, torch.zeros(2, 3))
    with torch.no_grad():
        actor.net[-1].bias.fill_(1e3)
    assert actor.dist(torch.randn(2, 4))[0].max().item() <= 5.0


def _action_rewarding_model(direction):
    """A real RSSM set by hand so that h_{t+1} = tanh(ELU(a_t)) (update gate shut, no recurrence, no s_t input),
    a reward head r = direction . h, and a zero value net: the imagined reward favours actions along `direction`."""
    torch.manual_seed(0)
    args = c.Args(**{**TINY, "deter": 2, "hidden": 2, "stoch": 1})
    agent, _, _ = c.build_agent(args, OBS, 2, torch.device("cpu"))
    rssm = agent.wm.rssm
    with torch.no_grad():
        rssm.img_in[0].weight.copy_(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])), rssm.img_in[0].bias.zero_()
        rssm.gru.weight_ih.zero_(), rssm.gru.weight_hh.zero_(), rssm.gru.bias_hh.zero_(), rssm.gru.bias_ih.zero_()
        rssm.gru.weight_ih[4:6].copy_(torch.eye(2))  # candidate n = tanh(x); gates ordered (r, z, n)
        rssm.gru.bias_ih[2:4].fill_(-30.0)  # update gate z = 0: h' = n
    agent.wm.reward = torch.nn.Linear(3, 1)
    agent.value = torch.nn.Linear(3, 1)
    with torch.no_grad():
        agent.wm.reward.weight.copy_(torch.tensor([[*direction, 0.0]])), agent.wm.reward.bias.zero_()
        agent.value.weight.zero_(), agent.value.bias.zero_()
    return agent


@pytest.mark.parametrize("direction", [(1.0, -1.0), (-1.0, 1.0)])
def test_dreamer_actor_gradient_moves_the_mean_toward_rewarded_actions(direction, one_thread):
    agent = _action_rewarding_model(direction)
    actor, wm = agent.actor, agent.wm
    deter, stoch = torch.rand(32, 2), torch.randn(32, 1)
    start = c.feature(deter, stoch)
    before = actor.mode(start).detach()
    opt = torch.optim.Adam(actor.parameters(), lr=1e-2)
    wm.requires_grad_(False)
    for _ in range(10):
        actor_loss, _, _ = c.behaviour_loss(wm, actor, agent.value, deter, stoch, horizon=3, gamma=0.99, lam=0.95)
        opt.zero_grad()
        actor_loss.backward()
        opt.step()
    moved = actor.mode(start).detach() - before  # (32, 2)
    d = torch.tensor(direction)
    assert (moved @ d > 0).all(), moved
    assert (torch.sign(moved.mean(0)) == d).all()


def test_behaviour_losses_by_hand_and_only_actor_and_value_get_them(one_thread):
    args, agent, _, _ = tiny_build()
    wm, actor, value = agent.wm, agent.actor, agent.value
    deter, stoch, g, lam = torch.randn(4, 16), torch.randn(4, 4), 0.9, 0.5
    wm.requires_grad_(False)
    torch.manual_seed(3)
    actor_loss, value_loss, _ = c.behaviour_loss(wm, actor, value, deter, stoch, 3, g, lam)
    torch.manual_seed(3)  # the same samples, written out: states s_0..s_3, losses on s_1, s_2 weighted 1, g
    h, s, feats = deter, stoch, [c.feature(deter, stoch)]
    for _ in range(3):
        h, s = wm.rssm.img_step(h, s, actor(feats[-1].detach())[0])
        feats.append(c.feature(h, s))
    r = [wm.reward(f)[:, 0] for f in feats]
    v = [value(f)[:, 0] for f in feats]
    R2 = r[2] + g * v[3]
    R1 = r[1] + g * ((1 - lam) * v[2] + lam * R2)
    torch.testing.assert_close(actor_loss, -torch.stack([R1, g * R2]).mean())
    torch.testing.assert_close(value_loss, torch.stack([0.5 * (v[1] - R1) ** 2, g * 0.5 * (v[2] - R2) ** 2]).mean())
    wm.requires_grad_(True)


# --- SAC ---------------------------------------------------------------------------------------
def test_sac_target_hand_example():
    # y = r + g (1 - d) (min(Q'1, Q'2) - temperature log pi')
    y = c.sac_target(reward=torch.tensor([1.0, 2.0, 2.0]), next_q1=torch.tensor([3.0, 5.0, 5.0]),
                     next_q2=torch.tensor([4.0, 1.0, 1.0]), next_logp=torch.tensor([-1.0, 0.5, 0.5]),
                     terminal=torch.tensor([0.0, 0.0, 1.0]), gamma=0.9, temperature=0.2)
    torch.testing.assert_close(y, torch.tensor([1 + 0.9 * (3 + 0.2), 2 + 0.9 * (1 - 0.1), 2.0]))


def test_sac_transitions_run_along_time_and_not_across_episode_starts():
    B, T = 2, 4
    feat = (10 * torch.arange(B)[:, None] + torch.arange(T)[None]).float()[..., None]  # feat[b, t] = 10 b + t
    action, reward = feat[..., 0] + 100, feat[..., 0] + 1000
    is_first, is_terminal = torch.zeros(B, T, dtype=torch.bool), torch.zeros(B, T, dtype=torch.bool)
    is_first[1, 2], is_terminal[0, 3] = True, True
    s, a, r, s_next, term, valid = c.sac_transitions(feat, action, reward, is_first, is_terminal)
    torch.testing.assert_close(s_next[..., 0], s[..., 0] + 1)  # the next TIME step of the same sequence
    torch.testing.assert_close(a, s[..., 0] + 100)  # the action chosen at s_t
    torch.testing.assert_close(r, s[..., 0] + 1001)  # the reward received on arriving at s_{t+1}
    torch.testing.assert_close(term, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(valid, torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]]))


def test_sac_loss_moves_the_actor_and_trains_q_and_temperature(one_thread):
    runs = {}
    for alpha in (0.0, 1.0):
        args, agent, opts, _ = tiny_build(hybrid_alpha=alpha)
        old_target = [p.clone() for p in agent.sac.q_target.parameters()]
        old_q = [p.clone() for p in agent.sac.q.parameters()]
        old_temp = agent.sac.log_temperature.item()
        torch.manual_seed(5)
        c.update(agent, opts, batch(), args)
        runs[alpha] = [p.detach().clone() for p in agent.actor.parameters()]
        assert agent.sac.log_temperature.item() != old_temp
        assert all(not torch.equal(p, q) for p, q in zip(agent.sac.q.parameters(), old_q))
        for p_t, p_old, p in zip(agent.sac.q_target.parameters(), old_target, agent.sac.q.parameters()):
            torch.testing.assert_close(p_t, 0.995 * p_old + 0.005 * p)  # soft target, tau 0.005
    # same data and random numbers: only the SAC term of the actor loss differs
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(runs[0.0], runs[1.0]))
    # and the SAC actor loss alone has a gradient on every actor layer
    args, agent, _, _ = tiny_build()
    feat = torch.randn(2, 5, 20)
    _, sac_actor_loss, _, _ = c.sac_losses(agent.sac, agent.actor, feat, batch(), 0.99)
    grads = torch.autograd.grad(sac_actor_loss, list(agent.actor.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)


def test_every_loss_uses_the_pre_update_world_model(one_thread):
    # Dreamer v1 / CVRL code: all losses from the same parameters, optimisers applied at the end. So the actor,
    # value and Q updates cannot depend on how far the model optimiser moves the world model.
    after = {}
    for lr in (1e-1, 1e-6):
        args, agent, opts, _ = tiny_build(model_lr=lr)
        torch.manual_seed(5)
        c.update(agent, opts, batch(), args)
        after[lr] = [p.detach().clone() for m in (agent.actor, agent.value, agent.sac.q) for p in m.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(after[1e-1], after[1e-6]))


@pytest.mark.parametrize("overrides", [{}, {"generative": True}])
def test_bf16_update_stays_close_to_float32(overrides, one_thread):
    """--precision bf16: the same update (InfoNCE + SAC, or the decoder) from the same state and RNG gives losses
    within 2% of float32 (bf16 keeps 8 bits of mantissa, ~0.4% per rounding), and every metric, parameter and
    floating state_dict entry (SAC targets, temperature) stays float32 and finite."""
    out = {}
    for precision in ("fp32", "bf16"):
        args, agent, opts, _ = tiny_build(precision=precision, **overrides)
        torch.manual_seed(0)
        out[precision] = c.update(agent, opts, batch(), args)
        sd = [t for t in agent.state_dict().values() if t.is_floating_point()]
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in sd)
    assert out["bf16"].keys() == out["fp32"].keys()
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out["bf16"].values())
    obs_loss = "losses/image" if overrides else "losses/infonce"
    keys = (obs_loss, "losses/model", "losses/reward", "losses/kl", "losses/actor", "losses/value", "losses/sac_q",
            "losses/sac_actor", "stats/imagined_return")
    for k in keys:
        assert out["bf16"][k].item() == pytest.approx(out["fp32"][k].item(), rel=2e-2, abs=1e-3), k
    assert any(out["bf16"][k].item() != out["fp32"][k].item() for k in keys)  # bf16 did run


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_update_equals_eager(backend, one_thread, inductor_fallback_random, monkeypatch):
    """--compile: two compiled updates (world model with InfoNCE, Dreamer actor and value, SAC) from the same state
    and RNG give the eager losses, metrics and parameters within float32 tolerance (inductor reorders sums; its
    random numbers are switched to eager's for the comparison). aot_eager traces forward and backward without
    generating code (the default run); inductor, the --compile default, takes minutes to compile cold on a 2-core
    CPU (300 s in one run on a shared one; `python -m pytest -m slow`)."""
    monkeypatch.setattr(c, "COMPILED", {})  # compiled afresh for these tiny shapes
    batches = [batch(seed=0), batch(seed=1)]
    out, params = {}, {}
    for compile in (False, True):
        args, agent, opts, _ = tiny_build(compile=compile, compile_backend=backend)
        init = torch.cat([p.detach().flatten().clone() for p in agent.parameters()])
        torch.manual_seed(0)
        out[compile] = [c.update(agent, opts, data, args) for data in batches]
        params[compile] = torch.cat([p.detach().flatten() for p in agent.parameters()])
    assert list(c.COMPILED) == [backend]  # the compiled functions were used (and made once)
    for eager, compiled in zip(out[False], out[True]):
        assert "losses/infonce" in eager and "losses/sac_q" in eager
        assert_close_dicts(compiled, eager)
    torch.testing.assert_close(params[True], params[False], rtol=1e-4, atol=1e-5)
    assert not torch.equal(params[True], init)  # the updates did train (init: the same seed's fresh agent)


# --- MPC ---------------------------------------------------------------------------------------
def test_mpc_raises_v_lambda_and_leaves_every_parameter_untouched(one_thread):
    args, agent, _, _ = tiny_build(seed=2)
    before = {n: p.clone() for n, p in agent.named_parameters()}
    deter, stoch = torch.randn(3, 16), torch.randn(3, 4)
    with torch.no_grad():  # as when acting
        torch.manual_seed(0)
        actions, values, proposal = c.plan(agent.wm, agent.actor, agent.value, deter, stoch, horizon=4, gamma=0.99,
                                           lam=0.95, lr=0.05, iterations=6, explore=True)
        torch.manual_seed(0)
        _, flat, _ = c.plan(agent.wm, agent.actor, agent.value, deter, stoch, 4, 0.99, 0.95, 0.0, 3, True)
    assert actions.shape == (4, 3, 2) and values.shape == (6, 3) and actions.abs().max() <= 1
    assert (values[-1] > values[0]).all(), values  # gradient ascent on V_lambda(s_t), every env
    assert not torch.equal(actions[1:], proposal[1:])  # the whole sequence is optimised, not only a_0
    torch.testing.assert_close(flat, flat[:1].expand(3, -1))  # lr 0: one fixed latent sample, same value
    for n, p in agent.named_parameters():
        assert p.grad is None, n
        assert torch.equal(p, before[n]), n


# --- Table 2 switches --------------------------------------------------------------------------
@pytest.mark.parametrize("switch, present, absent", [
    ({}, {"losses/infonce", "losses/sac_q", "mpc/value"}, {"losses/image"}),
    ({"generative": True}, {"losses/image", "losses/sac_q", "mpc/value"}, {"losses/infonce"}),
    ({"reward_only": True}, {"losses/reward", "mpc/value"}, {"losses/infonce", "losses/image"}),
    ({"sac": False}, {"losses/infonce", "mpc/value"}, {"losses/sac_q", "losses/sac_actor"}),
    ({"mpc": False}, {"losses/infonce", "losses/sac_q"}, {"mpc/value"}),
])
def test_every_table2_switch_runs(switch, present, absent, one_thread):
    args, agent, opts, mpc = tiny_build(**switch)
    before = {n: p.clone() for n, p in agent.actor.named_parameters()}
    metrics = c.update(agent, opts, batch(), args)
    state = c.initial_state(agent, 2, torch.device("cpu"))
    action, state, act_metrics = c.policy(agent, state, batch()["obs"][:, 0], torch.ones(2, dtype=torch.bool),
                                          True, mpc)
    metrics.update(act_metrics)
    assert action.shape == (2, 2) and action.abs().max() <= 1
    assert present <= set(metrics) and not absent & set(metrics)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert any(not torch.equal(p, before[n]) for n, p in agent.actor.named_parameters())
    assert (agent.wm.decoder is not None) == bool(switch.get("generative"))


# --- Main: CLI, determinism, help, errors, console, signals ------------------------------------
def test_smoke_cli(tmp_path):
    """The real command line with a tiny model: final JSON line, finite losses, events, video, checkpoint."""
    flags = {**TINY, "env_id": "cartpole-balance", "total_timesteps": 300, "eval_every": 200, "eval_episodes": 2,
             "log_every": 100}
    final, run_dir, ea = run_cli("cvrl.py", tmp_path, flags, ("--capture-video", "--save-model"))
    assert math.isfinite(final["final_eval_return"]) and len(final["eval_returns"]) == 2
    assert final["updates"] == 3 + 3 * 2  # 3 pretrain updates at frame 102 (prefill done), 2 at 152, 202, 252
    assert_finite_scalars(ea, (
        "losses/infonce", "losses/reward", "losses/kl", "losses/model", "losses/actor", "losses/value",
        "losses/sac_q", "losses/sac_actor", "mpc/value", "eval/episodic_return", "charts/episodic_return",
        "charts/SPS"))
    assert "eval/video" in ea.Tags()["images"] and glob.glob(os.path.join(run_dir, "videos", "eval_*.mp4"))
    ckpt = torch.load(os.path.join(run_dir, "cvrl.pt"), weights_only=True)
    assert ckpt["script"] == "cvrl.py" and set(ckpt["nets"]) == {"wm", "actor", "value", "sac"}
    assert len(ckpt["opts"]) == 4 and all(o["state"] for o in ckpt["opts"])  # model, value, actor, sac: all stepped
    assert {"q", "q_target", "log_temperature"} <= {k.split(".")[0] for k in ckpt["nets"]["sac"]}
    assert ckpt["loop"]["global_step"] == 300 and ckpt["loop"]["updates"] == final["updates"]
    assert ckpt["loop"]["next_train"] == 302 and ckpt["args"]["env_id"] == "cartpole-balance"
    assert ckpt["replay"] is None  # --save-model leaves the replay's head out


# --- Checkpoints (issue 13) -----------------------------------------------------------------------
# Prefill 40 frames, the 3 pretrain updates at frame 40 (the episode ends there: the next step is a 0-frame reset),
# then 2 updates at the end of every 40-frame cycle: frames 80, 120, 160, ...
CK = {**TINY, "env_id": "cartpole-balance", "num_envs": 1, "time_limit": 40, "prefill": 40, "train_every": 40,
      "eval_every": 10 ** 6, "eval_episodes": 1, "log_every": 40}


def replay_obs(run_dir, rows):
    """The first `rows` observations of the memory-mapped replay of a one-env run, (rows, 3, 64, 64)."""
    return np.fromfile(os.path.join(run_dir, "replay", "obs.bin"), np.uint8).reshape(-1, *OBS)[:rows]


def assert_error_in_process(capsys, argv, *needles):
    """What `python cvrl.py argv` does (its __main__ block), in this process to spare a start-up: exit code 2 and
    one line `error: ...` naming `needles` (tests/smoke.py's assert_cli_error, without the subprocess)."""
    import tyro

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        c.main(tyro.cli(c.Args, args=argv, default=c.saved_defaults(argv)))
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, lines)
    assert all(needle in lines[0] for needle in needles), (argv, needles, lines[0])


def test_resume_and_eval_checkpoint_cli(tmp_path, monkeypatch, capsys):
    """A finished run continues with a larger --total-timesteps from its end-of-run checkpoint (replay files kept,
    counters and the training schedule continued, no temporary file left); --eval-checkpoint prints its JSON
    line; resumed without a larger --total-timesteps, the finished run prints its saved summary; bad input
    (changed flags, a run already past the --total-timesteps it still had to reach, a missing dir, a truncated
    file, another script's checkpoint) gives one error line."""
    import tyro

    final, run_dir, _ = run_cli("cvrl.py", tmp_path, {**CK, "total_timesteps": 80})
    assert final["updates"] == 3 + 2  # pretrain at 40, a cycle at 80
    ck = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    rows = ck["replay"]["count"]
    assert ck["loop"]["global_step"] == 80 and ck["loop"]["next_train"] == 120 and rows > 40
    before = replay_obs(run_dir, rows)
    # (the CLI with --precision bf16 and --compile: flags a resumed run may change)
    out = resume_cli("cvrl.py", tmp_path, final["run_dir"], "--total-timesteps", "160", "--precision", "bf16",
                     "--compile", "--compile-backend", "aot_eager")
    assert f"resumed {final['run_dir']} at frame 80 after 5 updates (replay {rows} steps)" in out["stdout"]
    assert "compiling the update (--compile)" in out["stdout"] and "compiled the update in" in out["stdout"]
    # the schedule continues: no second pretrain, 2 updates at the cycle ends 120 and 160
    assert out["final"]["global_step"] == 160 and out["final"]["updates"] == 5 + 2 * 2
    np.testing.assert_array_equal(replay_obs(run_dir, rows), before)
    assert not glob.glob(os.path.join(run_dir, "*.tmp")) and not glob.glob(os.path.join(run_dir, "replay", "*.tmp"))
    with open(os.path.join(run_dir, "args.json")) as f:
        saved = json.load(f)
    assert saved["total_timesteps"] == 160 and saved["precision"] == "bf16"
    path = os.path.join(final["run_dir"], "checkpoint.pt")
    ev = eval_checkpoint_cli("cvrl.py", tmp_path, path, "--eval-episodes", "1")
    assert ev["global_step"] == 160 and len(ev["eval_returns"]) == 1 and math.isfinite(ev["eval_return"])
    assert ev["checkpoint"] == path and 0 < ev["eval_return"] <= 40  # 40 frames of reward <= 1 each
    # bad input: changed flags through the real command line (the saved flags become its defaults) ...
    assert_cli_error("cvrl.py", tmp_path, ["--resume", final["run_dir"], "--total-timesteps", "400", "--deter", "32"],
                     "--deter 32", "checkpoint's 16")
    assert_cli_error("cvrl.py", tmp_path, ["--resume", final["run_dir"], "--total-timesteps", "400", "--env-id",
                                           "walker-walk"], "--env-id walker-walk", "cartpole-balance")
    # ... and the rest through the same code in this process
    monkeypatch.chdir(tmp_path)
    # a finished run (killed before its JSON line, say) prints its saved summary, also with a smaller
    # --total-timesteps; an unfinished one refuses a --total-timesteps it has passed
    for total in ("160", "120"):
        capsys.readouterr()
        summary = c.main(tyro.cli(c.Args, args=["--resume", final["run_dir"], "--total-timesteps", total],
                                  default=c.saved_defaults(["--resume", final["run_dir"]])))
        assert {k: v for k, v in summary.items() if k != "losses"} == out["final"] and summary["losses"]
        assert capsys.readouterr().out.strip() == json.dumps(out["final"])
    ck = {"args": {"total_timesteps": 400}, "loop": {"global_step": 160}}
    with pytest.raises(SystemExit):
        c.checked_against(dataclasses.replace(c.Args(**TINY), total_timesteps=120), ck, "--resume")
    assert "--total-timesteps 120: the run is already at frame 160" in capsys.readouterr().err
    assert_error_in_process(capsys, ["--resume", "no/such/dir"], "--resume", "no/such/dir")
    bad = truncated_copy(path, tmp_path / "bad.pt")
    assert_error_in_process(capsys, ["--eval-checkpoint", str(bad)], "truncated or corrupt", "bad.pt")
    other = tmp_path / "other"  # a whole checkpoint, but another script's, whose flags do not fit cvrl.py's
    other.mkdir()
    ck = torch.load(path, weights_only=True)
    torch.save({**ck, "script": "dreamerv3.py", "args": {**ck["args"], "action_repeat": None}}, other / "checkpoint.pt")
    assert_error_in_process(capsys, ["--resume", str(other), "--total-timesteps", "400"],
                            "checkpoint of dreamerv3.py", "not of cvrl.py")


@pytest.mark.parametrize("overrides", [{}, {"sac": False}])
def test_update_after_restore_equals_the_uninterrupted_update(tmp_path, overrides, one_thread):
    """Save after two updates, make a third; a fresh agent (other init) restored from the checkpoint, with the
    replay reopened from its files, draws the same batch and makes exactly the same third update: every network
    (soft Q targets and the SAC temperature included), every optimiser state. Under --no-sac the SAC entries
    are None and the optimiser list keeps its positions."""
    from common.replay import ReplayBuffer

    N, rng = 2, np.random.default_rng(0)

    def agent(seed):
        args, agent, opts, _ = tiny_build(seed, **overrides)
        return args, agent, opts, ReplayBuffer(200, N, OBS, 2, seed=args.seed, path=str(tmp_path / "replay"),
                                               resume=seed != 0)

    def step(agent, opts, replay):
        data = {k: torch.as_tensor(v) for k, v in replay.sample(args.batch_size, args.batch_length).items()}
        return c.update(agent, opts, data, args)

    args, agent1, opts1, replay1 = agent(0)
    for t in range(40):
        replay1.add(rng.integers(0, 256, (N, *OBS), dtype=np.uint8), rng.uniform(-1, 1, (N, 2)).astype(np.float32),
                    rng.normal(size=N).astype(np.float32), np.full(N, t % 15 == 0), np.zeros(N, bool))
    for _ in range(2):
        step(agent1, opts1, replay1)
    path = str(tmp_path / "checkpoint.pt")
    c.save_checkpoint(path, args, agent1, opts1, {"global_step": 80, "next_train": 120}, replay1)
    ck = torch.load(path, weights_only=True)
    assert [o is None for o in ck["opts"]] == [False, False, False, bool(overrides)]
    assert (ck["nets"]["sac"] is None) == bool(overrides)
    m1 = step(agent1, opts1, replay1)
    _, agent2, opts2, replay2 = agent(1)
    assert not torch.equal(agent2.wm.encoder.net[0].weight, agent1.wm.encoder.net[0].weight)
    if agent1.sac is not None:  # a different temperature too, so restoring it is checked
        with torch.no_grad():
            agent2.sac.log_temperature.fill_(0.0)
    assert c.restore_checkpoint(c.load_checkpoint(path, "--resume"), agent2, opts2, replay2) == \
        {"global_step": 80, "next_train": 120}
    m2 = step(agent2, opts2, replay2)
    assert {k: v.item() for k, v in m1.items()} == {k: v.item() for k, v in m2.items()}
    sd1, sd2 = agent1.state_dict(), agent2.state_dict()
    assert sd1.keys() == sd2.keys() and ("sac.q_target.0.0.weight" in sd1) != bool(overrides)
    for n in sd1:
        assert torch.equal(sd1[n], sd2[n]), n
    assert opts1.keys() == opts2.keys() == ({"model", "value", "actor"} | (set() if overrides else {"sac"}))
    for k in opts1:
        s1, s2 = opts1[k].state_dict()["state"], opts2[k].state_dict()["state"]
        assert s1.keys() == s2.keys() and all(torch.equal(s1[i][j], s2[i][j]) for i in s1 for j in s1[i]), k


def test_sigkill_after_first_checkpoint_then_resume(tmp_path):
    """SIGKILL right after the first checkpoint appears (a cycle end); --resume continues from the checkpoint's
    frame to the final JSON line with the uninterrupted run's update count, the replay rows written before the
    checkpoint intact, no temporary file left, and every TensorBoard log point exactly once."""
    run_dir, ck = kill_after_first_checkpoint("cvrl.py", tmp_path, {**CK, "total_timesteps": 240,
                                                                     "checkpoint_every": 80})
    saved, rows = ck["loop"]["global_step"], ck["replay"]["count"]
    # between cycles: right after the round of updates at frame 80 (the pretrain round at 40 came before 80)
    assert saved == 80 and ck["loop"]["updates"] == 3 + 2 and ck["loop"]["next_train"] == 120 and rows > 0
    before = replay_obs(run_dir, rows)
    out = resume_cli("cvrl.py", tmp_path, run_dir)
    assert f"at frame {saved} after {ck['loop']['updates']} updates" in out["stdout"]
    assert out["final"]["global_step"] == 240 and out["final"]["updates"] == 3 + 2 * 5  # as without the kill
    np.testing.assert_array_equal(replay_obs(run_dir, rows), before)
    assert not glob.glob(os.path.join(run_dir, "*.tmp")) and not glob.glob(os.path.join(run_dir, "replay", "*.tmp"))
    ea = events(run_dir)
    # every log point once: none duplicated by the resumed run, none lost at the checkpoint's own frame
    assert [e.step for e in ea.Scalars("charts/SPS")] == list(range(40, 241, 40))
    assert [e.step for e in ea.Scalars("charts/updates")] == list(range(40, 241, 40))
    assert [e.value for e in ea.Scalars("charts/updates")] == [0, 5, 7, 9, 11, 13]  # (pretrain: after the log at 40)


def test_same_seed_same_losses(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    args = c.Args(**{**TINY, "time_limit": 40, "prefill": 60, "train_every": 40}, env_id="cartpole-balance",
                  total_timesteps=120, eval_every=10 ** 6, eval_episodes=1, log_every=120)
    first, second = c.main(args), c.main(args)
    assert first["updates"] > 0 and "losses/infonce" in first["losses"]
    assert first["losses"] == second["losses"]


def test_help_documents_every_hyperparameter_with_its_source(capsys):
    assert_help_documents_every_hyperparameter(c.Args, capsys, (
        "CVRL App. B: 6e-4", "CVRL App. B: 8e-5", "CVRL Sec. 4.1: 50", "CVRL App. B: 30", "CVRL App. B: 0.003",
        "CVRL code: 1;", "Dreamer v1: 3.0", "Dreamer v1 code: 5", "our choice", 'Table 2 "CVRL-generative"',
        'Table 2 "CVRL-reward-only"', 'Table 2 "CVRL-no-SAC"', 'Table 2 "CVRL-no-MPC"'))


@pytest.mark.parametrize("argv, needles", [
    (["--env-id", "walker-sprint"], ["--env-id", "walker-sprint"]),
    (["--env-id", "Hopper-v5"], ["--env-id Hopper-v5", "learns from pixels"]),
    (["--total-timesteps", "-5"], ["--total-timesteps", "-5"]),
    (["--train-every", "0"], ["--train-every", "got 0"]),
    (["--prefill", "-1"], ["--prefill", "got -1"]),
    (["--batch-length", "1"], ["--batch-length", "got 1"]),
    (["--buffer-size", "10"], ["--buffer-size", "got 10"]),
    (["--gamma", "1.5"], ["--gamma", "1.5"]),
    (["--mpc-iterations", "0"], ["--mpc-iterations", "--no-mpc", "got 0"]),
    (["--generative", "--reward-only"], ["--generative", "--reward-only"]),
    (["--checkpoint-every", "-1"], ["--checkpoint-every", "got -1"]),
    (["--resume", "runs/x", "--eval-checkpoint", "x.pt"], ["--resume", "--eval-checkpoint"]),
    (["--background", "natural", "--background-dir", "/nonexistent/videos"], ["--background-dir"]),
    (["--precision", "fp16"], ["--precision must be one of fp32, bf16, got fp16"]),
    (["--compile-backend", "eager"], ["--compile-backend must be one of inductor, aot_eager, got eager"]),
    (["--seed", "-1"], ["--seed must be >= 0, got -1"]),
    (["--resume", "nowhere"], ["--resume nowhere: no such run directory (give the run's folder, e.g. runs/NAME)"]),
])
def test_bad_input_is_one_line_naming_the_flag(tmp_path, argv, needles):
    assert_cli_error("cvrl.py", tmp_path, argv, *needles)
    assert not os.path.exists(tmp_path / "runs")  # before any heavy work


def test_progress_eta_follows_the_current_phase_and_whole_training_cycles():
    """Fake clock: a fast prefill (1000 frames/s), pretrain updates at 2/s, then training cycles of 10 s of acting
    (100 frames) and 40 s of updates (20): the training ETA is that of whole cycles, also in mid-cycle."""
    p, now, out = progress_after_a_fast_phase(c, "prefill", window_s=120.0)
    p.set_phase("pretrain", 10)  # ends after 10 updates, at one frame count
    for u in range(1, 5):
        now[0] = 2 + u / 2
        p.step(2000, u)
    assert p.eta() == pytest.approx(3.0) and "pretrain ends in 3 s" in p.line()  # 6 updates left at 2/s
    now[0], frames, updates = 5.0, 2000, 10
    p.set_phase("train", 10_000, by_cycle=True)
    for k in range(4):
        for _ in range(10):  # acting: 10 frames/s
            now[0], frames = now[0] + 1, frames + 10
            p.step(frames, updates)
        assert k > 0 or (math.isnan(p.eta()) and "ETA ?" in p.line())  # unknown before the first cycle ends
        for u in range(20):  # a round of 20 updates, 2 s each, ends the cycle
            now[0], updates = now[0] + 2, updates + 1
            p.step(frames, updates, cycle_end=u == 19)
    for _ in range(5):  # half-way through the acting of the next cycle
        now[0], frames = now[0] + 1, frames + 10
        p.step(frames, updates)
    # 100 frames and 20 updates per 50 s; ETA: acting alone (10 frames/s) would say 755 s
    assert_progress_shows(p, out, 2.0, 0.4, (10_000 - 2_450) / 2.0, "ETA 62.9 min", "updates 90 (0.40/s)")


def test_sigint_stops_cleanly_with_events_written(tmp_path):
    """Ctrl-C with --checkpoint-every 0: one line saying that no checkpoint was written."""
    flags = {**TINY, "env_id": "cartpole-balance", "num_envs": 2, "total_timesteps": 100_000, "eval_every": 10**6,
             "eval_episodes": 1, "log_every": 40, "checkpoint_every": 0}
    assert "prefilling" in assert_clean_interrupt("cvrl.py", tmp_path, flags, signal.SIGINT)
    assert_interrupt_wrote_no_checkpoint(tmp_path)


def test_sigterm_before_the_first_checkpoint_writes_one_then_resume_finishes(tmp_path):
    flags = {**CK, "total_timesteps": 400, "checkpoint_every": 10**6}
    assert_sigterm_writes_a_checkpoint_then_resume_finishes("cvrl.py", tmp_path, flags, min_updates=3)


def test_resume_of_a_run_cut_in_its_final_evaluation_evaluates_then_finishes(tmp_path, monkeypatch, one_thread):
    """An evaluation cut by an interrupt runs again after --resume: here the final one, with the frames done."""
    monkeypatch.chdir(tmp_path)
    run_dir, loop = cut_the_final_evaluation(c, c.Args(**{**CK, "total_timesteps": 80, "mpc": False}), monkeypatch)
    assert loop["global_step"] == 80 and loop["eval_step"] == -1 and loop["updates"] == 3 + 2
    final = c.main(dataclasses.replace(c.saved_defaults(["--resume", run_dir]), resume=run_dir))
    assert final["global_step"] == 80 and final["updates"] == loop["updates"] and len(final["eval_returns"]) == 1


def test_track_writes_an_offline_wandb_run(tmp_path):
    flags = {**TINY, "env_id": "cartpole-balance", "total_timesteps": 80, "eval_every": 80, "eval_episodes": 1,
             "log_every": 40, "time_limit": 40, "prefill": 40, "train_every": 40}
    assert_tracks_offline("cvrl.py", tmp_path, flags)


def test_non_finite_loss_stops_the_run(tmp_path, monkeypatch, one_thread, capsys):
    monkeypatch.chdir(tmp_path)
    args = c.Args(**{**TINY, "time_limit": 40, "prefill": 40}, env_id="cartpole-balance", total_timesteps=120,
                  eval_every=10 ** 6, eval_episodes=1, log_every=80, mpc=False, checkpoint_every=40)
    err = non_finite_loss_run(c, args, "losses/reward", monkeypatch, capsys)
    path = os.path.join(glob.glob("runs/*")[0], "checkpoint.pt")  # written after the pretrain round at frame 40
    assert err == [
        f"error: non-finite losses/reward = nan in the updates logged at frame 80 (update 3); last checkpoint: {path}"]


def test_non_finite_loss_through_the_cli(tmp_path):
    """--model-lr 1e30 blows the world model up at its first updates: one line naming the metric, the frame, the
    update and the last checkpoint, exit code 3, no traceback, the events written. (--log-every 2: the log right after
    the pretrain round at frame 42 catches it, before that round's checkpoint and before a model gone NaN acts NaN,
    which to_env would stop with its own line.)"""
    flags = {**CK, "total_timesteps": 400, "checkpoint_every": 40, "model_lr": 1e30, "log_every": 2,
             "time_limit": 100}
    line = assert_cli_error("cvrl.py", tmp_path, [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()] + ["--no-mpc"],
                            "error: non-finite losses/", "in the updates logged at frame 42 (update 3); last "
                            "checkpoint: none", code=3)
    assert glob.glob(str(tmp_path / "runs" / "*" / "events.out.tfevents.*")), line


def test_too_large_buffer_fails_before_anything_is_built_or_created(tmp_path):
    assert_cli_error("cvrl.py", tmp_path, ["--env-id", "cartpole-balance", "--buffer-size", "100000000"],
                     "--buffer-size 100000000")
    assert not os.path.exists(tmp_path / "runs")


def test_help_reads_naturally(capsys):
    """--help: no double negative, no "if toggled" on a switch that defaults to True, --sac / --no-sac and
    --mpc / --no-mpc shown in both forms (and --no-mpc still parses)."""
    import tyro

    with pytest.raises(SystemExit):
        tyro.cli(c.Args, args=["--help"])
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "--no-no-" not in text and "--sac, --no-sac" in text and "--mpc, --no-mpc" in text
    for field in dataclasses.fields(c.Args):
        if field.default is True:
            i = text.index(f"--{field.name.replace('_', '-')}, --no-")
            assert "toggle" not in text[i:text.index("(default: True)", i)], field.name
    assert tyro.cli(c.Args, args=["--no-mpc", "--no-sac"]) == c.Args(mpc=False, sac=False)


@pytest.mark.parametrize("overrides", [{}, {"generative": True}])
def test_update_and_acting_create_no_tensor_beside_the_parameters(overrides, one_thread):
    """GPU safety without a GPU: under torch.device("meta") every tensor created without device= lands on meta, and
    an op mixing it with the CPU parameters fails; two updates and a few acting steps (MPC and the actor alone,
    exploring and not) must run. Adam creates its step counters lazily with torch.tensor(), on the CPU also in a
    CUDA run (torch's design): one update before the meta block creates them."""
    args, agent, opts, mpc = tiny_build(**overrides)
    data = batch()
    c.update(agent, opts, data, args)
    with torch.device("meta"):
        for _ in range(2):
            metrics = c.update(agent, opts, data, args)
        for acting in (mpc, {**mpc, "iterations": 0}):
            state = c.initial_state(agent, 2, torch.device("cpu"))
            for t, training in enumerate((True, True, False)):
                action, state, _ = c.policy(agent, state, data["obs"][:, t], data["is_first"][:, t], training, acting)
    assert all(v.device.type == "cpu" and torch.isfinite(v) for v in metrics.values())
    assert action.device.type == "cpu" and action.shape == (2, 2)


def test_nan_action_stops_the_run_before_the_simulator_fails(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    args = c.Args(**{**TINY, "time_limit": 40, "prefill": 40}, env_id="cartpole-balance", total_timesteps=120,
                  eval_every=10 ** 6, eval_episodes=1, log_every=80, mpc=False, checkpoint_every=0)
    assert_nan_action_stops_the_run(c, args, monkeypatch, capsys)
