"""Tests of mudreamer.py: what the paper changes on top of dreamerv3.py (whose maths tests/test_dreamerv3.py covers).

Value targets (Eq. 5) by hand, the action predictor's inputs, the decoder's stop-gradient, BatchNorm modes,
the collapse monitor, every Table 3 ablation in a smoke run, one smoke run through the real command line, and
the run as a user sees it: one-line errors, the progress ETA, Ctrl-C, --track; checkpoints: --resume (after a
finished run and after SIGKILL), --eval-checkpoint, bad checkpoints, and the update after a restore.
"""

import copy
import glob
import json
import math
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn as nn

import mudreamer as m
from smoke import (DREAMER_BAD_INPUTS, DREAMER_TINY, assert_clean_interrupt, assert_cli_error, assert_close_dicts,
                   assert_dreamer_update_and_acting_create_no_tensor_beside_the_parameters, assert_finite_scalars,
                   assert_nan_action_stops_the_run, assert_sigterm_writes_a_checkpoint_then_resume_finishes,
                   assert_tracks_offline, cut_the_final_evaluation, dreamer_main_args, eval_checkpoint_cli, events,
                   fill_pixel_replay, kill_after_first_checkpoint, non_finite_loss_run, random_pixel_batch,
                   resume_cli, run_cli, truncated_copy)

TINY = DREAMER_TINY  # the sizes of every tiny run here


def _agent(args, action_dim=2, discrete=False, decoder=True, batch_norm=True, seed=0):
    """World model, slow value, actor, critic, slow critic, return norm and the four optimisers, as main() builds them."""
    torch.manual_seed(seed)
    a = args
    wm = m.WorldModel((3, 16, 16), action_dim, a.deter, a.stoch, a.classes, a.units, a.mlp_layers, a.cnn_depth,
                      a.unimix, a.reward_bins, discrete, a.actor_min_std, a.actor_max_std, batch_norm,
                      a.bn_momentum, decoder)
    feat = a.deter + a.stoch * a.classes
    actor = m.Actor(feat, action_dim, a.units, a.mlp_layers, discrete, a.actor_min_std, a.actor_max_std, a.unimix)
    critic, slow_critic = m.Critic(feat, a.units, a.mlp_layers, 255), m.Critic(feat, a.units, a.mlp_layers, 255)
    slow_critic.load_state_dict(critic.state_dict())
    slow_value = m.copy.deepcopy(wm.heads["value"]).requires_grad_(False)
    opts = (torch.optim.Adam([p for n, p in wm.named_parameters() if not n.startswith("decoder.")], lr=1e-3),
            torch.optim.Adam(actor.parameters(), lr=1e-3), torch.optim.Adam(critic.parameters(), lr=1e-3),
            torch.optim.Adam(wm.decoder.parameters(), lr=1e-3) if decoder else None)
    return wm, slow_value, actor, critic, slow_critic, m.ReturnNorm(0.99, 5, 95, 1.0), opts


def _batch(B=3, T=6, A=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    is_first = torch.zeros(B, T, dtype=torch.bool)
    is_first[:, 0] = True
    return dict(obs=torch.randint(0, 256, (B, T, 3, 16, 16), dtype=torch.uint8, generator=g),
                action=torch.rand(B, T, A, generator=g) * 2 - 1, reward=torch.randn(B, T, generator=g),
                is_first=is_first, is_terminal=torch.zeros(B, T, dtype=torch.bool))


def _tiny_args(**kw):
    return m.Args(**{**TINY, **kw})


def test_paper_defaults():
    a = m.Args()
    assert (a.kl_dyn, a.kl_rep, a.free_bits, a.pred_scale, a.reward_loss_scale) == (0.95, 0.05, 1.0, 1.0, 1.0)
    assert (a.value_ema_decay, a.bn_momentum, a.gamma, a.lam) == (0.99, 0.9, 0.997, 0.95)
    assert (a.batch_size, a.batch_length, a.train_ratio, a.num_envs, a.deter, a.stoch, a.classes) == (16, 64, 512, 4, 512, 32, 32)
    assert a.value_predictor and a.action_predictor and a.batch_norm
    # Table 8: Linear + BatchNorm + SiLU in the representation network, torch momentum 1 - 0.9; LayerNorm elsewhere.
    rssm = m.RSSM(deter=8, stoch=2, classes=3, units=8, action_dim=2, embed_dim=4, unimix=0.01)
    bn = [x for x in rssm.modules() if isinstance(x, nn.BatchNorm1d)]
    assert len(bn) == 1 and bn[0] is rssm.obs_out[0] and bn[0].momentum == pytest.approx(0.1)
    assert isinstance(m.RSSM(8, 2, 3, 8, 2, 4, 0.01, batch_norm=False).obs_out[0], nn.LayerNorm)


def test_value_targets_hand_computed():
    # One sequence of T = 5 rows, gamma 0.9, lambda 0.5. Row 2 is terminal (c_2 = 0), row 3 starts a new
    # episode (is_first), so the step 2 -> 3 is no transition.  v' = [0.5, 1, 2, 4, 8].
    #   R_4 = v'_4 = 8 (bootstrap, not returned)
    #   R_3 = r_4 + g c_4 ((1 - l) v'_4 + l R_4) = 1 + 0.9 (4 + 4) = 8.2
    #   R_2 = v'_2 = 2 (cut: is_first at row 3, masked)
    #   R_1 = r_2 + g c_2 (...) = 2 + 0 = 2 (terminal: only the reward)
    #   R_0 = r_1 + g c_1 ((1 - l) v'_1 + l R_1) = 1 + 0.9 (0.5 + 1) = 2.35
    reward = torch.tensor([[0.0, 1.0, 2.0, 0.0, 1.0]])
    cont = torch.tensor([[1.0, 1.0, 0.0, 1.0, 1.0]])
    is_first = torch.tensor([[True, False, False, True, False]])
    slow = torch.tensor([[0.5, 1.0, 2.0, 4.0, 8.0]])
    ret, mask = m.value_targets(reward, cont, is_first, slow, gamma=0.9, lam=0.5)
    torch.testing.assert_close(ret, torch.tensor([[2.35, 2.0, 2.0, 8.2]]))
    torch.testing.assert_close(mask, torch.tensor([[1.0, 1.0, 0.0, 1.0]]))
    # No ends, lambda = 1: the discounted sum of the real rewards bootstrapped with gamma^k v'(s_T).
    ret, mask = m.value_targets(torch.tensor([[9.0, 1.0, 2.0, 3.0]]), torch.ones(1, 4), torch.zeros(1, 4, dtype=torch.bool),
                                torch.tensor([[7.0, 7.0, 7.0, 5.0]]), gamma=0.9, lam=1.0)
    torch.testing.assert_close(ret[0, 0], torch.tensor(1 + 0.9 * 2 + 0.81 * 3 + 0.729 * 5))
    assert mask.min() == 1  # reward[:, 0] (received before the sequence) is never used


def test_value_and_action_losses_masked_and_shape_the_representation(one_thread):
    a = _tiny_args()
    wm, slow_value, *_ = _agent(a)
    scales = {"reward": 0.0, "cont": 0.0, "kl_dyn": 0.0, "kl_rep": 0.0, "value": 1.0, "action": 1.0}
    # Every row starts an episode: no step has a real transition, so both losses are 0 (all masked).
    data = _batch()
    data["is_first"][:] = True
    loss, metrics, _ = m.world_model_loss(wm, slow_value, data, scales, 1.0, a.gamma, a.lam)
    assert loss.item() == 0 and metrics["losses/value"].item() == 0 and metrics["losses/action"].item() == 0
    # Normal data: the value loss at init is ln(255) on the unmasked steps (zero-initialised output), and with
    # a non-zero output layer its gradient reaches the encoder and the RSSM; never the slow copy v'.
    data = _batch()
    for k in ("value", "action"):
        loss, metrics, _ = m.world_model_loss(wm, slow_value, data, {**scales, "value": 0.0, "action": 0.0, k: 1.0},
                                              1.0, a.gamma, a.lam)
        if k == "value":
            assert metrics["losses/value"].item() == pytest.approx(math.log(255), rel=1e-5)
            nn.init.normal_(wm.heads["value"][-1].weight)
            loss = m.world_model_loss(wm, slow_value, data, {**scales, "action": 0.0}, 1.0, a.gamma, a.lam)[0]
        wm.zero_grad()
        loss.backward()
        for net in (wm.encoder, wm.rssm.obs_in, wm.rssm.gru, wm.heads[k]):
            assert sum(p.grad.abs().sum() for p in net.parameters()) > 0, (k, net)
        assert all(p.grad is None for p in slow_value.parameters())


def test_value_and_action_losses_match_eq3_eq5_by_hand(one_thread):
    """losses["value"] = NLL of head(s_t) under R_t of Eq. 5 bootstrapped by the SLOW v', masked where is_first[t+1];
    losses["action"] = -ln p(clip(a_{t-1}) | x_t, s_{t-1}) masked where is_first[t]; an episode starts mid-sequence."""
    a = _tiny_args()
    wm, slow_value, *_ = _agent(a)
    torch.manual_seed(1)
    nn.init.normal_(wm.heads["value"][-1].weight, std=0.3)  # online head depends on s_t
    slow_value.load_state_dict(wm.heads["value"].state_dict())
    with torch.no_grad():
        slow_value[-1].bias.add_(torch.linspace(-1.0, 1.0, 255))  # v' != v
    data = _batch(B=2, T=6)
    data["is_first"][0, 3] = True  # row 0: a new episode at t = 3
    data["is_terminal"][1, 4] = True  # row 1: c_4 = 0
    data["action"] = data["action"] * 3  # raw Normal samples, partly outside [-1, 1]: the env executes clip(a)
    scales = {"reward": 0.0, "cont": 0.0, "kl_dyn": 0.0, "kl_rep": 0.0, "value": 1.0, "action": 1.0}
    torch.manual_seed(7)
    _, metrics, _ = m.world_model_loss(wm, slow_value, data, scales, 1.0, a.gamma, a.lam)
    with torch.no_grad():
        torch.manual_seed(7)  # the same latent samples
        embed = wm.encoder(data["obs"])
        deter, stoch, _, _ = wm.rssm.observe(embed, data["action"], data["is_first"])
        feat = m.feature(deter, stoch)  # (B, T, F)
        slow = m.twohot_mean(slow_value(feat), wm.bins)
        assert (slow - m.twohot_mean(wm.heads["value"](feat), wm.bins)).abs().min() > 1e-3
        ret, valid = m.value_targets(data["reward"], 1.0 - data["is_terminal"].float(), data["is_first"], slow,
                                     a.gamma, a.lam)
        assert valid[0, 2] == 0 and valid.sum() == 2 * 5 - 1
        value = (m.twohot_loss(wm.heads["value"](feat[:, :-1]), ret, wm.bins) * valid).mean()
        _, logp, _ = wm.heads["action"](torch.cat([embed[:, 1:], feat[:, :-1]], -1))
        executed = data["action"][:, :-1].clamp(-1, 1)
        assert (executed != data["action"][:, :-1]).any()
        action = (-logp(executed) * ~data["is_first"][:, 1:]).mean()
    torch.testing.assert_close(metrics["losses/value"], value)
    torch.testing.assert_close(metrics["losses/action"], action)


@pytest.mark.parametrize("discrete", [False, True])
def test_action_predictor_draws_no_random_numbers(discrete, one_thread):
    """--no-action-predictor must not change any later random draw: the predictor's unused sample is not drawn."""
    a = _tiny_args()
    wm, slow_value, *_ = _agent(a, discrete=discrete)
    data = _batch()
    if discrete:
        data["action"] = nn.functional.one_hot(torch.arange(18).view(3, 6) % 2, 2).float()
    after = []
    for action in (False, True):
        scales = {"reward": 1.0, "cont": 1.0, "kl_dyn": 0.95, "kl_rep": 0.05, "value": 1.0}
        scales.update({"action": 1.0} if action else {})
        torch.manual_seed(5)
        m.world_model_loss(wm, slow_value, data, scales, 1.0, a.gamma, a.lam)
        after.append(torch.rand(4))
    torch.testing.assert_close(after[0], after[1], rtol=0, atol=0)


def test_action_predictor_reads_only_x_t_and_s_prev(one_thread):
    """Output j predicts a_j from [x_{j+1}, s_j]: changing a_2 changes s_3.. (so outputs 3, 4) but not outputs 0-2."""
    a = _tiny_args()
    wm, slow_value, *_ = _agent(a)
    outs = []
    wm.heads["action"].net.register_forward_hook(lambda mod, inp, out: outs.append(out.detach()))
    scales = {"reward": 1.0, "cont": 1.0, "kl_dyn": 0.95, "kl_rep": 0.05, "value": 1.0, "action": 1.0}

    def predict(data):
        torch.manual_seed(3)  # same latent samples in every call
        m.world_model_loss(wm, slow_value, data, scales, 1.0, a.gamma, a.lam)
        return outs[-1]  # (B, T-1, 2A)

    data = _batch()
    base = predict(data)
    changed = dict(data, action=data["action"].clone())
    changed["action"][:, 2] += 0.7  # a_2
    out = predict(changed)
    torch.testing.assert_close(out[:, :3], base[:, :3], rtol=0, atol=0)
    assert (out[:, 3:] - base[:, 3:]).abs().amin(-1).min() > 0  # the later states do see a_2
    changed = dict(data, obs=data["obs"].clone())
    changed["obs"][:, 3] = 255 - changed["obs"][:, 3]  # o_3 -> x_3 feeds the prediction of a_2
    out = predict(changed)
    torch.testing.assert_close(out[:, :2], base[:, :2], rtol=0, atol=0)
    assert (out[:, 2] - base[:, 2]).abs().amin(-1).min() > 0


def test_decoder_changes_no_other_gradient(one_thread):
    """Same seed with the decoder on and off: identical init, identical gradients and steps of everything else."""
    a = _tiny_args()
    runs = {}
    for decoder in (True, False):
        agent = _agent(a, decoder=decoder)
        wm, slow_value, actor, critic, slow_critic, norm, opts = agent
        torch.manual_seed(5)
        metrics = m.update(wm, actor, critic, slow_critic, slow_value, norm, opts, _batch(), a)
        runs[decoder] = (agent, metrics)
    (on, m_on), (off, m_off) = runs[True], runs[False]
    for net_on, net_off in zip(on[:5], off[:5]):
        named_off = dict(net_off.named_parameters())
        for n, p in net_on.named_parameters():
            if n.startswith("decoder."):
                assert p.grad is not None and p.grad.abs().sum() > 0  # the decoder does learn
                continue
            assert (p.grad is None) == (named_off[n].grad is None), n
            if p.grad is not None:
                torch.testing.assert_close(p.grad, named_off[n].grad, rtol=0, atol=0, msg=n)
            torch.testing.assert_close(p, named_off[n], rtol=0, atol=0, msg=n)
    assert "losses/image" in m_on and "losses/image" not in m_off
    for k in m_off:
        torch.testing.assert_close(m_on[k], m_off[k], rtol=0, atol=0, msg=k)


def test_batchnorm_acts_with_running_stats_and_trains_with_batch_stats(one_thread):
    a = _tiny_args()
    wm, slow_value, actor, critic, slow_critic, norm, opts = _agent(a)
    bn = wm.rssm.obs_out[0]
    stats = lambda: [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]  # noqa: E731
    before = stats()
    # Acting as main() does: one env (a batch of 1 would be an error for BatchNorm in train mode).
    state = (torch.zeros(1, a.deter), torch.zeros(1, a.stoch, a.classes), torch.zeros(1, 2))
    obs = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8)
    m.set_mode(False, wm, actor)
    for first in (True, False, False):
        _, state = m.policy(wm, actor, state, obs, torch.tensor([first]))
    m.set_mode(True, wm, actor)
    for x, y in zip(stats(), before):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    m.collapse_monitor(wm, _batch())  # logging does not touch them either
    for x, y in zip(stats(), before):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert bn.training and wm.training
    # A training step updates them once per time step of the sequential posterior loop.
    m.update(wm, actor, critic, slow_critic, slow_value, norm, opts, _batch(T=6), a)
    after = stats()
    assert after[2].item() == 6
    assert not torch.allclose(after[0], before[0]) and not torch.allclose(after[1], before[1])


def test_slow_value_is_an_ema_of_the_value_predictor(one_thread):
    a = _tiny_args()
    wm, slow_value, actor, critic, slow_critic, norm, opts = _agent(a)
    old = [p.clone() for p in slow_value.parameters()]
    m.update(wm, actor, critic, slow_critic, slow_value, norm, opts, _batch(), a)
    for p_slow, p_old, p in zip(slow_value.parameters(), old, wm.heads["value"].parameters()):
        torch.testing.assert_close(p_slow, 0.99 * p_old + 0.01 * p)
    assert any(not torch.equal(p_old, p) for p_old, p in zip(old, wm.heads["value"].parameters()))


def test_collapse_monitor_values():
    a = _tiny_args()
    wm = _agent(a)[0]
    data = _batch(B=4, T=5)
    out = m.collapse_monitor(wm, data)
    with torch.no_grad():
        embed = torch.nn.functional.normalize(wm.encoder(data["obs"]).flatten(0, 1), dim=-1)  # (20, E)
    assert out["mudreamer/embed_std"] == pytest.approx(embed.std(0).mean().item(), rel=1e-5)
    assert out["mudreamer/deter_std"] > 0
    data["obs"][:] = data["obs"][0, 0]  # every image the same: the encoder features have no spread at all
    assert m.collapse_monitor(wm, data)["mudreamer/embed_std"] == pytest.approx(0.0, abs=1e-6)


def test_bf16_update_stays_close_to_float32(one_thread):
    """--precision bf16: the same update (decoder and BatchNorm on) from the same state and RNG gives losses within
    2% of float32, and every metric, parameter and BatchNorm statistic stays float32."""
    out = {}
    for precision in ("fp32", "bf16"):
        a = _tiny_args(precision=precision)
        wm, slow_value, actor, critic, slow_critic, norm, opts = _agent(a)
        torch.manual_seed(0)
        out[precision] = m.update(wm, actor, critic, slow_critic, slow_value, norm, opts, _batch(), a)
        assert all(t.dtype == torch.float32 for net in (wm, actor, critic) for t in net.state_dict().values()
                   if t.is_floating_point())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out["bf16"].values())
    for k in ("losses/world_model", "losses/reward", "losses/value", "losses/action", "losses/image", "stats/kl",
              "stats/imagined_return"):
        assert out["bf16"][k].item() == pytest.approx(out["fp32"][k].item(), rel=2e-2, abs=1e-3), k
    assert out["bf16"]["losses/image"].item() != out["fp32"]["losses/image"].item()  # bf16 did run


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_update_equals_eager(backend, one_thread, inductor_fallback_random, monkeypatch):
    """--compile: two compiled updates (decoder and BatchNorm on) from the same state and RNG give the eager losses,
    metrics, parameters and buffers (BatchNorm running statistics, return normaliser) within float32 tolerance
    (inductor reorders sums; its random numbers are switched to eager's for the comparison). Between the updates
    the agent acts in eval mode as main() does, and switching back to train mode recompiles nothing.
    (aot_eager traces the same graphs, forward and backward, without generating code; a cold inductor compile
    takes minutes on a CPU, so that variant is marked slow.)"""
    import torch._dynamo
    monkeypatch.setattr(m, "COMPILED", {})  # compiled afresh for these tiny shapes
    torch._dynamo.reset()  # (no cache entries left by the other backend's run in this process)
    a = _tiny_args(compile_backend=backend)
    base = _agent(a)[:6]  # wm, slow_value, actor, critic, slow_critic, return_norm
    # B = 4, not dreamerv3's 2: over 2 samples BatchNorm's output is +-1 (up to its eps) whatever its input, so
    # the gradient into rssm.obs_in is float32 rounding noise (~1e-9) that Adam's first step, lr g / (|g| + eps),
    # turns into differences of lr / 3 between eager and inductor; over 4 samples the test is well posed.
    B, T = 4, 4
    g = torch.Generator().manual_seed(1)
    batches = [random_pixel_batch(B, T, g) for _ in range(2)]
    obs = torch.randint(0, 256, (1, 3, 16, 16), dtype=torch.uint8, generator=g)
    state = lambda nets: {f"{i}.{k}": v for i, net in enumerate(nets)  # noqa: E731
                          for k, v in net.state_dict().items()}  # parameters and buffers
    out, states = {}, {}
    for compile in (False, True):
        wm, slow_value, actor, critic, slow_critic, norm = nets = [copy.deepcopy(x) for x in base]
        opts = (torch.optim.Adam([p for n, p in wm.named_parameters() if not n.startswith("decoder.")], lr=1e-3),
                torch.optim.Adam(actor.parameters(), lr=1e-3), torch.optim.Adam(critic.parameters(), lr=1e-3),
                torch.optim.Adam(wm.decoder.parameters(), lr=1e-3))
        a.compile = compile
        torch.manual_seed(0)
        out[compile] = [m.update(wm, actor, critic, slow_critic, slow_value, norm, opts, batches[0], a)]
        m.set_mode(False, wm, actor)  # act with the running statistics, as main() does between updates
        m.policy(wm, actor, m.initial_state(wm, actor, 1, "cpu"), obs, torch.tensor([True]))
        m.set_mode(True, wm, actor)
        with torch._dynamo.config.patch(error_on_recompile=True):  # the mode switch left the guards satisfied
            out[compile].append(m.update(wm, actor, critic, slow_critic, slow_value, norm, opts, batches[1], a))
        states[compile] = state(nets)
    assert len(m.COMPILED) == 1 and backend in m.COMPILED  # the compiled functions were used (and made once)
    for eager, compiled in zip(out[False], out[True]):
        assert_close_dicts(compiled, eager)
    assert_close_dicts(states[True], states[False])
    assert states[True]["0.rssm.obs_out.0.num_batches_tracked"].item() == 2 * T  # BatchNorm trained per step
    before = state(base)
    assert any(not torch.equal(states[True][k], before[k]) for k in before)  # the updates did train
    for k in ("0.rssm.obs_out.0.running_mean", "0.rssm.obs_out.0.running_var", "0.encoder.net.0.weight"):
        assert not torch.equal(states[True][k], before[k]), k


@pytest.mark.parametrize("argv, needles", DREAMER_BAD_INPUTS + [
    (["--batch-size", "1"], ["--batch-size", "BatchNorm", "got 1"]),
    (["--bn-momentum", "1.5"], ["--bn-momentum", "1.5"]),
    (["--value-ema-decay", "1.0"], ["--value-ema-decay", "1.0"]),
    (["--kl-rep", "-0.1"], ["--kl-rep", "-0.1"]),
])
def test_bad_input_is_one_line_naming_the_flag(tmp_path, argv, needles):
    assert_cli_error("mudreamer.py", tmp_path, argv, *needles)


def test_sigint_stops_cleanly_with_events_written(tmp_path):
    flags = {**TINY, "env_id": "cartpole-balance", "num_envs": 2, "total_timesteps": 100_000, "eval_every": 10**6,
             "eval_episodes": 1, "log_every": 40, "video_every": 0}
    assert_clean_interrupt("mudreamer.py", tmp_path, flags, signal.SIGINT)
    assert "; checkpoint written: --resume runs/" in open(tmp_path / "err.txt").read()


def test_sigterm_before_the_first_checkpoint_writes_one_then_resume_finishes(tmp_path):
    flags = {**TINY, "env_id": "cartpole-balance", "num_envs": 1, "total_timesteps": 300, "eval_every": 10**6,
             "eval_episodes": 1, "log_every": 40, "video_every": 0, "checkpoint_every": 10**6}
    assert_sigterm_writes_a_checkpoint_then_resume_finishes("mudreamer.py", tmp_path, flags,
                                                            then_without_checkpoints=True)


def test_resume_of_a_run_cut_in_its_final_evaluation_evaluates_then_finishes(tmp_path, monkeypatch, one_thread):
    """An evaluation cut by an interrupt runs again after --resume: here the final one, with the frames done."""
    monkeypatch.chdir(tmp_path)
    run_dir, loop = cut_the_final_evaluation(m, dreamer_main_args(m), monkeypatch)
    assert loop["global_step"] == 80
    out = m.main(dreamer_main_args(m, resume=str(tmp_path / run_dir)))
    assert out["global_step"] == 80 and math.isfinite(out["final_eval_return"]) and len(out["eval_returns"]) == 1


@pytest.mark.parametrize("discrete", [False, True])
def test_update_and_acting_create_no_tensor_beside_the_parameters(discrete, one_thread):
    """With the decoder on (the default); acting on the first two of the batch's four streams."""
    assert_dreamer_update_and_acting_create_no_tensor_beside_the_parameters(m, _tiny_args(), _batch(B=4), discrete)




def test_track_writes_an_offline_wandb_run(tmp_path):
    flags = {**TINY, "env_id": "cartpole-balance", "num_envs": 1, "total_timesteps": 80, "eval_every": 80,
             "eval_episodes": 1, "log_every": 40, "video_every": 0, "time_limit": 40}
    assert_tracks_offline("mudreamer.py", tmp_path, flags)


@pytest.mark.parametrize("flags", [dict(value_predictor=False), dict(action_predictor=False),
                                   dict(batch_norm=False), dict(kl_dyn=1.0, kl_rep=0.0),
                                   dict(value_predictor=False, action_predictor=False, decoder=False)])
def test_ablation_smoke(flags, tmp_path, monkeypatch, one_thread):
    """Each Table 3 ablation (and the run without decoder) trains in main(); acting always in eval mode; the
    replay rows follow common/replay.py (the obs after an episode's last one is first, with reward 0)."""
    monkeypatch.chdir(tmp_path)
    seen, rows = [], []
    policy = m.policy

    class Recorder(m.ReplayBuffer):
        def add(self, obs, action, reward, is_first, is_terminal):
            rows.append((float(reward[0]), bool(is_first[0])))
            super().add(obs, action, reward, is_first, is_terminal)

    def checked_policy(wm, actor, state, obs, is_first):
        assert not wm.training and not actor.training  # act with the running statistics
        seen.append(wm)
        return policy(wm, actor, state, obs, is_first)

    monkeypatch.setattr(m, "policy", checked_policy)
    monkeypatch.setattr(m, "ReplayBuffer", Recorder)
    args = _tiny_args(env_id="cartpole-balance", num_envs=1, total_timesteps=80, time_limit=20, eval_every=10**6,
                      eval_episodes=1, log_every=80, video_every=0, **flags)
    out = m.main(args)
    assert out["updates"] > 0 and all(math.isfinite(v) for v in out["losses"].values())
    losses = out["losses"]
    assert ("losses/value" in losses) == flags.get("value_predictor", True)
    assert ("losses/action" in losses) == flags.get("action_predictor", True)
    assert ("losses/image" in losses) == flags.get("decoder", True)
    firsts = [i for i, (_, first) in enumerate(rows) if first]
    assert firsts == list(range(0, len(rows), 20 // 2 + 1)) and all(rows[i][0] == 0 for i in firsts)  # 10 steps + reset obs
    assert all(r > 0 for i, (r, _) in enumerate(rows) if i not in firsts)  # cartpole-balance pays every step
    norm = seen[0].rssm.obs_out[0]
    assert isinstance(norm, nn.BatchNorm1d if flags.get("batch_norm", True) else nn.LayerNorm)
    if "kl_rep" in flags:
        assert losses["losses/world_model"] == pytest.approx(
            losses["losses/reward"] + losses["losses/cont"] + losses["losses/value"] + losses["losses/action"]
            + 1.0 * losses["losses/kl_dyn"], rel=1e-4)  # (averaged over updates: linear, so it still adds up)


def test_smoke_cli(tmp_path):
    """The real command line (natural backgrounds, default offline clips): JSON line, finite losses, events, pictures."""
    flags = {**TINY, "env_id": "walker-run", "background": "natural", "num_envs": 1, "total_timesteps": 160,
             "time_limit": 40, "eval_every": 120, "eval_episodes": 1, "log_every": 60, "video_every": 120}
    final, run_dir, ea = run_cli("mudreamer.py", tmp_path, flags, ("--save-model", "--capture-video"))
    assert math.isfinite(final["final_eval_return"]) and final["updates"] > 10
    import av

    with av.open(os.path.join(run_dir, "videos", "eval_160.mp4")) as c:  # 256x256 render | agent's view, natural
        assert next(c.decode(c.streams.video[0])).to_ndarray(format="rgb24").shape == (256, 512, 3)
    assert "eval/video" in ea.Tags()["images"]
    assert_finite_scalars(ea, (
        "losses/reward", "losses/cont", "losses/value", "losses/action", "losses/image", "losses/kl_dyn",
        "losses/kl_rep", "stats/kl", "losses/actor", "losses/critic", "mudreamer/embed_std", "mudreamer/deter_std",
        "eval/episodic_return", "charts/SPS"))
    assert all(e.value > 0 for e in ea.Scalars("mudreamer/embed_std"))
    assert "openloop" in ea.Tags()["images"]
    ckpt = torch.load(os.path.join(run_dir, "mudreamer.pt"), weights_only=True)  # the checkpoint format
    assert set(ckpt["nets"]) == {"wm", "actor", "critic", "slow_critic", "slow_value", "return_norm"}
    assert len(ckpt["opts"]) == 4 and all(o is not None for o in ckpt["opts"])  # (the decoder's is the 4th)
    assert "rssm.obs_out.0.running_mean" in ckpt["nets"]["wm"] and ckpt["replay"] is None
    assert ckpt["loop"]["global_step"] == 160 and ckpt["args"]["background"] == "natural"


def _replay_obs(run_dir, rows):
    """The first `rows` observations of the single stream of a run's memory-mapped replay (cartpole, 3x64x64)."""
    return np.fromfile(os.path.join(run_dir, "replay", "obs.bin"), np.uint8).reshape(1, -1, 3, 64, 64)[:, :rows]


def test_resume_and_eval_checkpoint_cli(tmp_path):
    """A finished run continues with a larger --total-timesteps from its end-of-run checkpoint (replay files kept,
    counters continued, no temporary file left); --eval-checkpoint prints its JSON line; bad checkpoints, changed
    model or env flags give one error line."""
    flags = {**TINY, "env_id": "cartpole-balance", "num_envs": 1, "total_timesteps": 160, "eval_every": 1000,
             "eval_episodes": 1, "log_every": 80, "video_every": 0, "time_limit": 40}
    final, run_dir, _ = run_cli("mudreamer.py", tmp_path, flags)
    ck = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    rows = ck["replay"]["count"]
    assert ck["loop"]["global_step"] == 160 and ck["loop"]["updates"] == final["updates"] and rows > 80
    before = _replay_obs(run_dir, rows)
    # (the CLI with --precision bf16 and --compile: flags a resumed run may change)
    out = resume_cli("mudreamer.py", tmp_path, final["run_dir"], "--total-timesteps", "240", "--precision", "bf16",
                     "--compile", "--compile-backend", "aot_eager")
    assert "compiling the update (--compile)" in out["stdout"] and "compiled the update in" in out["stdout"]
    assert f"resumed {final['run_dir']} at frame 160 after {final['updates']} updates (replay {rows} steps)" \
        in out["stdout"]
    assert "resumed at frame 160" in out["stdout"] and "prefilling" not in out["stdout"]  # the cost: line
    assert out["final"]["global_step"] == 240 and out["final"]["updates"] > final["updates"]
    assert out["final"]["run_dir"] == final["run_dir"]  # in place
    np.testing.assert_array_equal(_replay_obs(run_dir, rows), before)
    ck = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert ck["loop"]["global_step"] == 240 and ck["loop"]["updates"] == out["final"]["updates"]
    assert ck["replay"]["count"] > rows and ck["args"]["total_timesteps"] == 240
    assert not glob.glob(os.path.join(run_dir, "*.tmp")) and not glob.glob(os.path.join(run_dir, "replay", "*.tmp"))
    steps = [e.step for e in events(run_dir).Scalars("charts/updates")]
    assert steps == [80, 160, 240], steps  # the resumed run logs on from the saved next_log
    path = os.path.join(final["run_dir"], "checkpoint.pt")
    ev = eval_checkpoint_cli("mudreamer.py", tmp_path, path, "--eval-episodes", "1")
    assert ev["global_step"] == 240 and ev["checkpoint"] == path and len(ev["eval_returns"]) == 1
    assert 0 < ev["eval_return"] <= 40  # cartpole-balance pays at most 1 per frame over a 40-frame episode
    # bad input: a changed model flag, a run that is already that long, a missing run dir, a truncated checkpoint,
    # another script's checkpoint, another environment
    resume = ["--resume", final["run_dir"], "--total-timesteps", "400"]
    assert_cli_error("mudreamer.py", tmp_path, resume + ["--no-decoder"], "--decoder False", "checkpoint's True")
    assert_cli_error("mudreamer.py", tmp_path, resume + ["--env-id", "walker-walk"], "--env-id walker-walk",
                     "cartpole-balance")
    again = resume_cli("mudreamer.py", tmp_path, final["run_dir"], "--total-timesteps", "200")  # a finished run
    assert again["final"] == out["final"] and again["stdout"].strip() == json.dumps(out["final"])  # its line, no more
    assert_cli_error("mudreamer.py", tmp_path, ["--resume", "no/such/dir"], "--resume", "no/such/dir")
    (tmp_path / "cut").mkdir()
    truncated_copy(os.path.join(run_dir, "checkpoint.pt"), tmp_path / "cut" / "checkpoint.pt")
    assert_cli_error("mudreamer.py", tmp_path, ["--resume", "cut"], "truncated or corrupt",
                     os.path.join("cut", "checkpoint.pt"))
    torch.save({"script": "dreamerv3.py", "args": ck["args"], "nets": {}, "opts": [], "loop": ck["loop"]},
               tmp_path / "other.pt")
    assert_cli_error("mudreamer.py", tmp_path, ["--eval-checkpoint", "other.pt"], "other.pt",
                     "a checkpoint of dreamerv3.py, not of mudreamer.py")


@pytest.mark.parametrize("decoder", [True, False])
def test_update_after_restore_equals_the_uninterrupted_update(decoder, tmp_path, one_thread):
    """Save after two updates, make a third; a fresh agent (other init, fresh BatchNorm statistics) restored from
    the checkpoint, with the replay reopened from its files, draws the same batch and makes exactly the same third
    update: every parameter and buffer (BatchNorm running statistics, return normaliser, slow value v', slow
    critic), every optimiser (the decoder's slot None without a decoder)."""
    from common.replay import ReplayBuffer

    a = _tiny_args(decoder=decoder)
    B, T, N, shape = a.batch_size, a.batch_length, 2, (3, 64, 64)
    rng = np.random.default_rng(0)

    def agent(seed):
        torch.manual_seed(seed)
        nets, opts = m.build_agent(a, shape, 1, False, torch.device("cpu"))
        return nets, opts, ReplayBuffer(200, N, shape, 1, seed=a.seed, path=str(tmp_path / "replay"),
                                        resume=seed != 0)

    def step(nets, opts, replay):
        data = {k: torch.as_tensor(v) for k, v in replay.sample(B, T).items()}
        return m.update(*nets.values(), opts, data, a)

    nets, opts, replay = agent(0)
    assert (opts[3] is not None) == decoder and len(opts) == 4
    fill_pixel_replay(replay, 40, rng)
    for _ in range(2):
        step(nets, opts, replay)
    path = str(tmp_path / "checkpoint.pt")
    m.save_checkpoint(path, a, nets, opts, {"global_step": 80}, replay)
    m1 = step(nets, opts, replay)
    nets2, opts2, replay2 = agent(1)
    assert not torch.equal(nets2["wm"].encoder.net[0].weight, nets["wm"].encoder.net[0].weight)
    bn, bn2 = nets["wm"].rssm.obs_out[0], nets2["wm"].rssm.obs_out[0]
    assert bn.num_batches_tracked == 3 * T and bn2.num_batches_tracked == 0
    assert not torch.equal(bn.running_mean, bn2.running_mean)
    assert not torch.equal(nets["slow_value"][-1].bias, nets["wm"].heads["value"][-1].bias)  # an EMA, not a copy
    ck = m.load_checkpoint(path, "--resume")
    assert (ck["opts"][3] is None) != decoder
    assert m.restore_checkpoint(ck, nets2, opts2, replay2) == {"global_step": 80}
    m2 = step(nets2, opts2, replay2)
    assert ("losses/image" in m1) == decoder
    assert {k: v.item() for k, v in m1.items()} == {k: v.item() for k, v in m2.items()}
    for k in nets:
        sd, sd2 = nets[k].state_dict(), nets2[k].state_dict()
        assert sd.keys() == sd2.keys(), k
        for n in sd:
            assert torch.equal(sd[n], sd2[n]), (k, n)
    for o, o2 in zip(opts, opts2):
        assert (o is None) == (o2 is None)
        if o is not None:
            s1, s2 = o.state_dict()["state"], o2.state_dict()["state"]
            assert s1.keys() == s2.keys() and len(s1) > 0
            assert all(torch.equal(s1[i][j], s2[i][j]) for i in s1 for j in s1[i])


def test_sigkill_after_first_checkpoint_then_resume(tmp_path):
    """SIGKILL right after the first checkpoint appears; --resume continues from the checkpoint's frame to the
    final JSON line, with the replay rows written before the checkpoint intact and no temporary file left. The
    checkpoint falls mid-episode, one step before a log with no update in between: the resumed run logs the saved
    metric sums and runs the collapse monitor on the saved last batch with the saved RNG, so that log equals the
    uninterrupted run's exactly. (A checkpoint on an episode's last frame, 120 here, would not: the uninterrupted run
    takes a reset step there, which counts toward the train ratio, and the resumed run does not.)"""
    flags = {**TINY, "env_id": "cartpole-balance", "num_envs": 1, "total_timesteps": 240, "eval_every": 10**6,
             "eval_episodes": 1, "log_every": 62, "video_every": 0, "time_limit": 40, "checkpoint_every": 122}
    (tmp_path / "killed").mkdir()
    run_dir, ck = kill_after_first_checkpoint("mudreamer.py", tmp_path / "killed", flags)
    loop, rows = ck["loop"], ck["replay"]["count"]
    assert loop["global_step"] == 122 and rows > 0 and loop["next_log"] == 124
    assert loop["updates_due"] == 0.0 and loop["n_metrics"] > 0 and loop["data"]["obs"].shape == (2, 8, 3, 64, 64)
    before = _replay_obs(run_dir, rows)
    out = resume_cli("mudreamer.py", tmp_path / "killed", run_dir)
    assert f"at frame 122 after {loop['updates']} updates (replay {rows} steps)" in out["stdout"]
    assert out["final"]["global_step"] == 240 and out["final"]["updates"] > loop["updates"]
    np.testing.assert_array_equal(_replay_obs(run_dir, rows), before)
    assert not glob.glob(os.path.join(run_dir, "*.tmp")) and not glob.glob(os.path.join(run_dir, "replay", "*.tmp"))
    ea = events(run_dir)
    steps = [e.step for e in ea.Scalars("charts/SPS")]
    assert steps == sorted(set(steps)) and 124 in steps, steps  # TensorBoard continues without duplicated points
    # The same run uninterrupted up to that log (no checkpoints: the replay in memory, nothing else changes)
    (tmp_path / "whole").mkdir()
    _, _, whole = run_cli("mudreamer.py", tmp_path / "whole", {**flags, "total_timesteps": 124, "checkpoint_every": 0})
    for tag in ("losses/world_model", "losses/value", "losses/action", "losses/image", "losses/actor",
                "mudreamer/embed_std", "mudreamer/deter_std"):
        at = lambda acc: [e.value for e in acc.Scalars(tag) if e.step == 124]  # noqa: E731
        assert at(ea) == at(whole) and len(at(ea)) == 1, (tag, at(ea), at(whole))


def test_non_finite_loss_stops_the_run(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    err = non_finite_loss_run(m, dreamer_main_args(m), "losses/reward", monkeypatch, capsys)
    assert len(err) == 1 and err[0].startswith(
        "error: non-finite losses/reward = nan in the updates logged at frame 40 (update ")
    assert err[0].endswith("; last checkpoint: none"), err


def test_nan_action_stops_the_run_before_the_simulator_fails(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)
    assert_nan_action_stops_the_run(m, dreamer_main_args(m), monkeypatch, capsys)
