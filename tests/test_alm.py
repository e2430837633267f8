"""alm.py: values from the paper's equations on hand-computed examples, the replay alignment, every
ablation flag, and smoke runs through the real command line."""

import glob
import json
import math
import os
import signal
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.distributions as td

from alm import (Agent, Args, check_args, critic_loss, main, gaussian_kl, lambda_returns, linear_schedule, log_odds,
                 make_optimizers, policy_loss, policy_objective, replay_capacity, representation_loss,
                 reward_classifier_loss, soft_update, split_transitions, update)
from alm import act as alm_act
from common.replay import ReplayBuffer
from smoke import (assert_clean_interrupt, assert_cli_error, assert_progress_shows, assert_tracks_offline,
                   eval_checkpoint_cli, events, kill_after_first_checkpoint, progress_after_a_fast_phase, resume_cli,
                   truncated_copy)
from smoke import run_cli as smoke_run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(latent_dim=4, hidden_dim=16, model_hidden_dim=16, batch_size=8)


def tiny_agent(obs_dim=3, action_dim=2, seed=0):
    torch.manual_seed(seed)
    return Agent(obs_dim, action_dim, TINY["latent_dim"], TINY["hidden_dim"], TINY["model_hidden_dim"])


def test_classifier_reward_is_log_odds():
    logits = torch.tensor([[0.3, 1.5], [2.0, -1.0]])
    assert torch.allclose(log_odds(logits), torch.tensor([1.2, -3.0]))
    c = torch.softmax(logits, -1)[:, 1]  # C = P(z' came from the encoder)
    assert torch.allclose(log_odds(logits), torch.log(c / (1 - c)), atol=1e-6)


def test_lambda_weighted_objective_k3_by_hand():
    gamma, lam = 0.9, 0.5
    r = torch.tensor([[1.0, 2.0, 3.0]])  # r~_0..r~_2
    q = torch.tensor([[10.0, 20.0, 30.0, 40.0]])  # Q(z_0..z_3)
    # k-step returns from t=0: G1 = 1 + .9*20 = 19; G2 = 1 + 1.8 + .81*30 = 27.1; G3 = 1 + 1.8 + 2.43 + .729*40 = 34.39
    # lambda-weighted over lengths 1..3: (1-lam)(G1 + lam G2) + lam^2 G3 = .5 * (19 + 13.55) + .25 * 34.39 = 24.8725
    # from t=1: (1-lam)(2 + .9*30) + lam (2 + 2.7 + .81*40) = 14.5 + 18.55 = 33.05; from t=2: 3 + .9*40 = 39
    G = lambda_returns(r, q, gamma, lam)
    assert torch.allclose(G, torch.tensor([[24.8725, 33.05, 39.0]]), atol=1e-4)
    # policy objective: mean_t gamma^t G_t = (24.8725 + .9 * 33.05 + .81 * 39) / 3
    assert math.isclose(policy_objective(r, q, gamma, lam).item(), (24.8725 + 29.745 + 31.59) / 3, rel_tol=1e-5)
    # lam = 1 gives the K-step return, lam = 0 the one-step return
    assert math.isclose(lambda_returns(r, q, gamma, 1.0)[0, 0].item(), 34.39, rel_tol=1e-5)
    assert math.isclose(lambda_returns(r, q, gamma, 0.0)[0, 0].item(), 19.0, rel_tol=1e-5)


def test_noise_schedule_endpoints_and_midpoint():
    assert linear_schedule(1.0, 0.1, 100_000, 0) == 1.0
    assert math.isclose(linear_schedule(1.0, 0.1, 100_000, 50_000), 0.55)
    assert math.isclose(linear_schedule(1.0, 0.1, 100_000, 100_000), 0.1)
    assert math.isclose(linear_schedule(1.0, 0.1, 100_000, 300_000), 0.1)
    a = Args()
    assert (a.expl_start, a.expl_end, a.expl_duration, a.expl_clip) == (1.0, 0.1, 100_000, 0.3)


def test_actor_noise_clip_and_action_bounds():
    agent = tiny_agent()
    z = torch.randn(1000, TINY["latent_dim"])
    mean, a = agent.actor(z, std=10.0, clip=0.3)
    inside = (a.abs() < 1 - 1e-3)  # away from the [-1, 1] clamp the noise is at most the clip
    assert ((a - mean)[inside].abs() <= 0.3 + 1e-6).all()
    assert (a.abs() <= 1).all()
    _, a_free = agent.actor(z, std=10.0)  # acting: unclipped noise, so most samples hit the clamp
    assert (a_free.abs() > 0.99).float().mean() > 0.5


def test_soft_update_moves_targets_by_tau():
    agent = tiny_agent()
    with torch.no_grad():
        for p in agent.encoder_target.parameters():
            p.fill_(0.0)
        for p in agent.encoder.parameters():
            p.fill_(1.0)
    soft_update(agent.encoder_target, agent.encoder, 0.005)
    for p in agent.encoder_target.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.005))
    soft_update(agent.encoder_target, agent.encoder, 0.005)  # 0.005 + 0.005 * (1 - 0.005)
    assert torch.allclose(next(agent.encoder_target.parameters()), torch.tensor(0.009975))


def test_targets_start_equal_and_move_by_tau_in_update():
    agent = tiny_agent()
    for p, pt in zip(agent.critic.parameters(), agent.critic_target.parameters()):
        assert torch.equal(p, pt)
    before_c = [p.clone() for p in agent.critic_target.parameters()]
    before_e = [p.clone() for p in agent.encoder_target.parameters()]
    args = Args(**TINY)
    optims, groups = make_optimizers(agent, 1e-3)
    seq, batch = fake_windows(3, 2, 8, 4), fake_windows(3, 2, 8, 2)
    update(agent, optims, groups, seq, batch, 0.5, args)
    for old, new, online in zip(before_c, agent.critic_target.parameters(), agent.critic.parameters()):
        assert torch.allclose(new, 0.995 * old + 0.005 * online, atol=1e-7)
    for old, new, online in zip(before_e, agent.encoder_target.parameters(), agent.encoder.parameters()):
        assert torch.allclose(new, 0.995 * old + 0.005 * online, atol=1e-7)


def test_gaussian_kl_matches_torch():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    s1, s2 = torch.rand(5, 4, generator=g) + 0.1, torch.rand(5, 4, generator=g) + 0.1
    ref = td.kl_divergence(td.Independent(td.Normal(m1, s1), 1), td.Independent(td.Normal(m2, s2), 1))
    assert torch.allclose(gaussian_kl(m1, s1, m2, s2), ref, atol=1e-5)


class LineEnv:
    """obs (s, step, episode); s' = s + a, reward(s, a) = 10 s + a; 3-step episodes, the 2nd one terminated,
    the others truncated. Action box +-0.4. Records every action it receives."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    action_space = gym.spaces.Box(-0.4, 0.4, (1,), np.float32)

    def __init__(self):
        self.episode, self.received = 0, []

    def obs(self):
        return np.array([self.s, self.t, self.episode], np.float32)

    def reset(self, seed=None):
        self.s, self.t, self.episode, self.ret = 0.0, 0, self.episode + 1, 0.0
        return self.obs(), {}

    def step(self, a):
        a = float(np.asarray(a).reshape(-1)[0])
        self.received.append(a)
        r = 10 * self.s + a
        self.s, self.t, self.ret = self.s + a, self.t + 1, self.ret + r
        end = self.t == 3
        info = {"episode": {"r": self.ret, "l": self.t}} if end else {}
        return self.obs(), r, end and self.episode == 2, end and self.episode != 2, info

    def close(self):
        pass


class LineVectorEnv:
    """One LineEnv behind gymnasium's vector API with NEXT_STEP autoreset (as common.envs.make_vector_env)."""

    def __init__(self):
        self.env, self.done, self.num_envs = LineEnv(), False, 1
        self.single_observation_space, self.single_action_space = LineEnv.observation_space, LineEnv.action_space

    def reset(self, seed=None):
        return self.env.reset()[0][None], {}

    def step(self, actions):
        if self.done:  # the step after an episode end ignores its action and returns the reset obs
            self.done = False
            return self.env.reset()[0][None], np.zeros(1), np.zeros(1, bool), np.zeros(1, bool), {}
        obs, r, term, trunc, info = self.env.step(actions[0])
        self.done = term or trunc
        infos = {"episode": {"r": np.array([info["episode"]["r"]]), "l": np.array([info["episode"]["l"]])},
                 "_episode": np.array([True])} if info else {}
        return obs[None], np.array([r]), np.array([term]), np.array([trunc]), infos

    def close(self):
        self.env.close()


def test_replay_alignment_of_mains_loop(tmp_path, monkeypatch):
    """main()'s own collection loop on a NEXT_STEP vector env with truncation (warm-up only): truncated last
    obs are stored with is_terminal 0, the obs after an episode's last one has is_first, reward[t+1] belongs
    to (s_t, a_t), and the env receives exactly the stored actions, in its own +-0.4 box."""
    import alm

    torch.set_num_threads(1)
    vec, buffers = LineVectorEnv(), []

    def capture(*a, **k):
        buffers.append(ReplayBuffer(*a, **k))
        return buffers[-1]

    monkeypatch.setattr(alm, "make_vector_env", lambda env_id, num_envs, seed: vec)
    monkeypatch.setattr(alm, "make_env", lambda env_id, seed: LineEnv())
    monkeypatch.setattr(alm, "ReplayBuffer", capture)
    monkeypatch.setattr(alm, "check_args", lambda args: None)  # (the CLI refuses a run that is all warm-up)
    monkeypatch.chdir(tmp_path)
    main(Args(total_timesteps=30, learning_starts=1000, buffer_size=100, eval_every=1000, eval_episodes=1,
              log_every=1000, **TINY))
    (rb,) = buffers
    n = rb.count
    obs, action, reward = rb.obs[0, :n], rb.action[0, :n, 0], rb.reward[0, :n]
    is_first, is_terminal = rb.is_first[0, :n], rb.is_terminal[0, :n]
    assert n == 39  # 30 frames (10 episodes) + 9 reset steps (NEXT_STEP); the last step is not stored
    step, episode = obs[:, 1], obs[:, 2]
    assert np.array_equal(is_first, step == 0) and is_first[0]
    assert np.array_equal(is_terminal, (step == 3) & (episode == 2))  # truncated ends are not terminal
    assert ((step == 3) & (episode != 2) & ~is_terminal).sum() >= 8
    assert np.array_equal(is_first[1:], step[:-1] == 3)  # is_first on the obs after each last obs
    assert np.allclose(reward[~is_first], (10 * obs[:-1, 0] + action[:-1])[~is_first[1:]], atol=1e-5)
    assert np.all(reward[is_first] == 0)
    mid = step[:-1] < 3  # inside an episode obs[t+1] = obs[t] + action[t]
    assert np.allclose(obs[1:, 0][mid], (obs[:-1, 0] + action[:-1])[mid], atol=1e-6)
    acted = step < 3  # the env saw each stored action of a non-last obs, in env units
    assert np.allclose(vec.env.received, action[acted][: len(vec.env.received)])
    assert len(vec.env.received) == 30 and np.abs(action).max() <= 0.4 and np.abs(action).max() > 0.2
    batch = {k: torch.as_tensor(v) for k, v in rb.sample(64, 2, within_episode=True).items()}
    s, a, r, s_next, terminal = (x.numpy() for x in split_transitions(batch))
    assert np.allclose(r, 10 * s[:, 0] + a[:, 0], atol=1e-5)  # reward[t+1] belongs to (s_t, a_t)
    assert np.array_equal(terminal == 1, (s_next[:, 1] == 3) & (s_next[:, 2] == 2))


def fake_windows(obs_dim, action_dim, B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(obs=torch.randn(B, T, obs_dim, generator=g), action=torch.rand(B, T, action_dim, generator=g) * 2 - 1,
                reward=torch.randn(B, T, generator=g), is_first=torch.zeros(B, T, dtype=torch.bool),
                is_terminal=torch.zeros(B, T, dtype=torch.bool))


def rep_loss(agent, seq, **flags):
    torch.manual_seed(1)  # the same latent samples for every variant
    return representation_loss(agent, seq["obs"], seq["action"], seq["is_terminal"], 0.5, 0.3, **flags)


def test_representation_loss_ablations_kl_term_and_value_term():
    agent, seq = tiny_agent(), fake_windows(3, 2, 8, 4)
    full, m = rep_loss(agent, seq)
    no_kl, _ = rep_loss(agent, seq, kl_term=False)
    no_value, _ = rep_loss(agent, seq, value_term=False)
    neither, _ = rep_loss(agent, seq, kl_term=False, value_term=False)
    K = 3  # loss = -mean(sum_t r_t - sum_t KL_t + Q)
    assert torch.allclose(full - no_kl, K * m["losses/kl"], atol=1e-5)
    assert torch.allclose(full - no_value, -m["stats/alm_q"], atol=1e-5)
    assert torch.allclose(neither, -K * m["stats/alm_reward"], atol=1e-5)
    assert m["losses/kl"] > 0
    seq["is_terminal"][:, -1] = True  # a terminal s_K contributes no Q
    assert torch.allclose(rep_loss(agent, seq)[0], no_value, atol=1e-5)


def test_representation_loss_gradients_only_where_eq7_says():
    agent, seq = tiny_agent(), fake_windows(3, 2, 8, 4)
    loss, _ = rep_loss(agent, seq)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.encoder.parameters())
    assert all(p.grad is not None for p in agent.model.parameters())
    assert all(p.grad is None for p in [*agent.actor.parameters(), *agent.encoder_target.parameters()])


def test_policy_loss_classifier_reward_ablation():
    agent = tiny_agent()
    z = torch.randn(8, TINY["latent_dim"])

    def run(flag, coef=0.1):
        torch.manual_seed(2)
        return policy_loss(agent, z, 0.5, 0.3, 0.99, 0.95, 3, coef, classifier_reward=flag)

    with_c, m = run(True)
    without_c, _ = run(False)
    zero_coef, _ = run(True, coef=0.0)
    assert torch.allclose(without_c, zero_coef)
    # the objective is linear in the rewards: the difference is the objective of c * bonus with Q = 0
    torch.manual_seed(2)
    z_seq, a_seq = [z], []
    for _ in range(3):
        a_seq.append(agent.actor(z_seq[-1], 0.5, 0.3)[1])
        mean, std = agent.model(z_seq[-1], a_seq[-1])
        z_seq.append(mean + std * torch.randn_like(mean))
    bonus = torch.stack([log_odds(agent.classify(z_seq[t], a_seq[t], z_seq[t + 1])) for t in range(3)], 1)
    expected = -policy_objective(0.1 * bonus, torch.zeros(8, 4), 0.99, 0.95)
    assert torch.allclose(with_c - without_c, expected, atol=1e-5)
    assert torch.allclose(m["stats/classifier_reward"], bonus.mean(), atol=1e-5)


def test_defaults_are_table3_and_bad_flags_are_named(capsys):
    a = Args()
    assert (a.gamma, a.learning_starts, a.tau, a.lam, a.batch_size, a.learning_rate, a.max_grad_norm) == \
        (0.99, 5000, 0.005, 0.95, 512, 1e-4, 100.0)
    assert (a.latent_dim, a.classifier_coef, a.hidden_dim, a.model_hidden_dim, a.horizon) == (50, 0.1, 512, 1024, 3)
    assert replay_capacity(Args(env_id="Humanoid-v5")) == 1_000_000
    assert replay_capacity(Args(env_id="HumanoidTruncatedObs-v5")) == 1_000_000
    assert replay_capacity(Args(env_id="Hopper-v5")) == 100_000
    assert replay_capacity(Args(env_id="Humanoid-v5", buffer_size=500)) == 500
    for bad, flag in [(dict(horizon=0), "--horizon"), (dict(lam=1.5), "--lam"), (dict(batch_size=0), "--batch-size"),
                      (dict(capture_video=True), "--capture-video")]:
        with pytest.raises(SystemExit) as exit_:
            check_args(Args(**bad))
        assert exit_.value.code == 2 and capsys.readouterr().err.startswith(f"error: {flag}")


def test_help_reads_naturally():
    """--help: no double negative, no "if toggled" / "toggles" on a switch that defaults to True, every switch shown
    in both forms."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "alm.py"), "--help"], capture_output=True, text=True,
                         env=dict(os.environ, COLUMNS="400"), timeout=120)
    assert out.returncode == 0 and "--no-no-" not in out.stdout
    for line in out.stdout.splitlines():
        if "(default: True)" in line:
            assert "toggle" not in line, line
    for flag in ("torch-deterministic", "cuda", "kl-term", "value-term", "classifier-reward"):
        assert f"--{flag}, --no-{flag}" in out.stdout, flag


def run_cli(tmp_path, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "alm.py"), "--env-id", "InvertedPendulum-v5", "--total-timesteps", "240",
           "--learning-starts", "80", "--batch-size", "16", "--hidden-dim", "32", "--model-hidden-dim", "32",
           "--latent-dim", "8", "--eval-every", "120", "--eval-episodes", "2", "--log-every", "100", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)


def read_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("extra", [["--save-model"], ["--no-kl-term", "--no-value-term", "--no-classifier-reward",
                                                       "--horizon", "1"]])
def test_smoke_cli(tmp_path, extra):
    out = run_cli(tmp_path, *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    window = 16 * (2 if "--horizon" in extra else 4)  # --batch-size 16 windows of --horizon + 1 steps
    assert f"cost: {window} + 32 replayed steps per update" in out.stdout and "[train] frames 200/240" in out.stdout
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert math.isfinite(summary["final_eval_return"]) and summary["global_step"] == 240 and summary["updates"] > 120
    run_dir = tmp_path / summary["run_dir"]
    scalars = read_scalars(run_dir)
    for tag in ["losses/alm", "losses/reward", "losses/classifier", "losses/critic", "losses/actor"]:
        assert scalars[tag] and all(math.isfinite(v) for v in scalars[tag]), tag
    assert "eval/episodic_return" in scalars and "charts/episodic_return" in scalars
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    logged = [e.step for f in glob.glob(str(run_dir / "events*")) for e in EventFileLoader(f).Load()
              for v in e.summary.value if v.tag == "eval/episodic_return"]
    assert logged == [120, 240]  # the events file itself: one point per evaluation, also at the last step
    assert ("stats/classifier_reward" in scalars) == ("--no-classifier-reward" not in extra)
    assert json.load(open(run_dir / "args.json"))["horizon"] == (1 if "--horizon" in extra else 3)
    if "--save-model" in extra:  # the checkpoint format, without the replay's head
        ckpt = torch.load(run_dir / "alm.pt", weights_only=True)
        assert ckpt["script"] == "alm.py" and ckpt["loop"]["global_step"] == 240 and ckpt["replay"] is None
        assert "encoder_target.net.0.weight" in ckpt["nets"]["agent"] and "critic_target.q2.0.weight" in \
            ckpt["nets"]["agent"]
        assert set(ckpt["opts"]) == {"model", "reward", "critic", "actor"} and ckpt["args"]["latent_dim"] == 8
        assert all(s["step"] == summary["updates"] for o in ckpt["opts"].values() for s in o["state"].values())


@pytest.mark.parametrize("argv, needles", [
    (["--env-id", "NoSuchEnv-v0"], ["--env-id", "NoSuchEnv-v0"]),
    (["--env-id", "cartpole-balance"], ["--env-id cartpole-balance", "learns from state vectors"]),
    (["--num-envs", "0"], ["--num-envs", "got 0"]),
    (["--total-timesteps", "-5"], ["--total-timesteps", "-5"]),
    (["--horizon", "0"], ["--horizon", "got 0"]),
    (["--learning-starts", "-1"], ["--learning-starts", "got -1"]),
    (["--learning-rate", "0"], ["--learning-rate", "got 0.0"]),
    (["--lam", "1.5"], ["--lam", "1.5"]),
    (["--buffer-size", "2"], ["--buffer-size", "got 2"]),
    (["--buffer-size", "40", "--num-envs", "16", "--batch-size", "8"], ["--buffer-size", "--num-envs 16", "got 40"]),
    (["--buffer-size", str(10**12)], ["--buffer-size 1000000000000", "GB"]),  # a MemoryError from the replay
    (["--capture-video"], ["--capture-video"]),
    (["--env-id", "minigrid-dynamic-obstacles-6x6"], ["--env-id minigrid-dynamic-obstacles-6x6", "state vectors",
                                                      "HalfCheetah-v5"]),
    (["--total-timesteps", "100"], ["--total-timesteps 100", "--learning-starts 5000"]),  # trains nothing
    (["--seed", "-1"], ["--seed must be >= 0, got -1"]),
    (["--checkpoint-every", "-1"], ["--checkpoint-every", "got -1"]),
    (["--resume", "runs/x", "--eval-checkpoint", "x.pt"], ["--resume", "--eval-checkpoint", "exclude"]),
])
def test_bad_input_is_one_line_naming_the_flag(tmp_path, argv, needles):
    assert_cli_error("alm.py", tmp_path, ["--env-id", "InvertedPendulum-v5", *argv], *needles)
    assert not (tmp_path / "runs").exists()  # before any work


def test_progress_eta_follows_the_current_phase():
    """Fake clock: a fast warm-up (1000 steps/s), then slow training (10 steps/s): the ETA is the training one."""
    import alm

    p, now, out = progress_after_a_fast_phase(alm, "warmup")
    p.set_phase("train", 10_000)
    for t in range(1, 61):  # 60 s of training at 10 steps/s and 10 updates/s (UTD 1)
        now[0] = 2 + t
        p.step(2000 + 10 * t, 10 * t)
    assert alm.fmt_time(float("nan")) == "?" and alm.fmt_time(7 * 3600) == "7.0 h"
    # ETA: the run's average (43 steps/s) would say 172 s
    assert_progress_shows(p, out, 10.0, 10.0, (10_000 - 2_600) / 10.0, "ETA 12.3 min", "updates 600 (10.00/s)")


CLI_TINY = dict(env_id="InvertedPendulum-v5", learning_starts=80, batch_size=16, hidden_dim=32, model_hidden_dim=32,
                latent_dim=8, eval_episodes=1)


def test_sigint_without_checkpoints_stops_cleanly_with_events_written(tmp_path):
    flags = {**CLI_TINY, "total_timesteps": 100_000, "eval_every": 10**6, "log_every": 20, "checkpoint_every": 0}
    out = assert_clean_interrupt("alm.py", tmp_path, flags, signal.SIGINT, scalars=("charts/SPS", "losses/actor"))
    assert "cost: 64 + 32 replayed steps per update" in out and "[warmup]" in out
    assert open(tmp_path / "err.txt").read().strip().endswith("updates; no checkpoint (--checkpoint-every 0)")
    assert not glob.glob(str(tmp_path / "runs" / "*" / "checkpoint.pt"))


def test_deferred_signals_hold_a_signal_until_the_section_ends():
    """on_signal raises KeyboardInterrupt at once outside a deferred section; inside one (nested too) the section
    runs to its end first."""
    import alm

    old = signal.signal(signal.SIGTERM, alm.on_signal)
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
        done = []
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
            with alm.deferred_signals():
                with alm.deferred_signals():
                    os.kill(os.getpid(), signal.SIGTERM)
                    done.append(1)
                done.append(2)
        assert done == [1, 2] and alm.SIGNALS == {"defer": 0, "pending": None}
    finally:
        signal.signal(signal.SIGTERM, old)


def test_sigterm_before_the_first_checkpoint_writes_one_and_resume_finishes(tmp_path):
    """SIGTERM during [train], long before the first periodic checkpoint: the run writes RUN/checkpoint.pt of the
    state at that frame (whole counters: one update per frame after the warm-up), says so in its one stderr line,
    and --resume (the checkpoint file's form) continues from that frame to the final JSON line."""
    import re

    flags = {**CLI_TINY, "total_timesteps": 100_000, "eval_every": 10**6, "log_every": 20}
    assert_clean_interrupt("alm.py", tmp_path, flags, signal.SIGTERM, scalars=("charts/SPS", "losses/actor"))
    err = open(tmp_path / "err.txt").read().strip()
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    name = os.path.join("runs", os.path.basename(run_dir))
    frame, updates = map(int, re.fullmatch(rf"interrupted \(SIGTERM\) at frame (\d+)/100000 after (\d+) updates; "
                                           rf"checkpoint written: --resume {re.escape(name)} continues from frame "
                                           rf"(\d+)", err).group(1, 2))
    ck = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert (ck["loop"]["global_step"], ck["loop"]["updates"]) == (frame, updates) and updates == frame - 80 + 1
    assert ck["loop"]["next_log"] > frame - 20 and ck["loop"]["summary"] is None
    out = resume_cli("alm.py", tmp_path, os.path.join(name, "checkpoint.pt"), "--total-timesteps", str(frame + 40))
    assert f"resumed at frame {frame}, wall time" in out["stdout"] and "warm-up of" not in out["stdout"]
    assert out["final"]["global_step"] == frame + 40 and out["final"]["updates"] == updates + 40
    assert out["final"]["run_dir"] == name and len(out["final"]["eval_returns"]) == 1


def test_track_writes_an_offline_wandb_run(tmp_path):
    flags = {**CLI_TINY, "total_timesteps": 120, "eval_every": 120, "log_every": 100}
    assert_tracks_offline("alm.py", tmp_path, flags)


def test_non_finite_loss_stops_the_run_naming_loss_and_update(tmp_path, monkeypatch, capsys):
    """Only the critic-loss metric is NaN, from the first update (at step 8 = learning_starts): one error line names
    that loss, its value, the log frame and that update; exit code 3; events and args.json are kept."""
    import alm

    torch.set_num_threads(1)
    real_critic_loss = alm.critic_loss

    def nan_metric(*a, **k):
        loss, m = real_critic_loss(*a, **k)
        return loss, {**m, "losses/critic": loss.detach() * float("nan")}

    monkeypatch.setattr(alm, "critic_loss", nan_metric)
    monkeypatch.chdir(tmp_path)
    args = Args(env_id="InvertedPendulum-v5", total_timesteps=20, learning_starts=8, log_every=10, eval_every=1000,
                eval_episodes=1, **TINY)
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 3
    assert capsys.readouterr().err == ("error: non-finite losses/critic = nan in the updates logged at frame 10 "
                                       "(update 1); last checkpoint: none\n")  # no other metric is named
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert any(f.name.startswith("events") for f in run_dir.iterdir()) and (run_dir / "args.json").exists()


def test_non_finite_loss_through_the_cli_is_one_line_and_exit_3(tmp_path):
    """--learning-rate 1e30 blows the losses up at the first update: one stderr line naming the metric, the log
    frame, the update and the last checkpoint (the periodic one at frame 40, still finite), no traceback."""
    flags = {**CLI_TINY, "total_timesteps": 200, "eval_every": 10**6, "log_every": 20, "checkpoint_every": 40,
             "learning_rate": 1e30}
    cmd = [sys.executable, os.path.join(ROOT, "alm.py")] + [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    path = os.path.join("runs", os.path.basename(run_dir), "checkpoint.pt")
    assert out.returncode == 3, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: non-finite losses/") and \
        lines[0].endswith(f"in the updates logged at frame 80 (update 1); last checkpoint: {path}"), out.stderr
    assert torch.load(tmp_path / path, weights_only=True)["loop"]["global_step"] == 40
    assert [e.step for e in events(run_dir).Scalars("charts/SPS")] == [20, 40, 60]  # flushed, none at 80


def test_buffer_size_checked_before_any_env_or_folder(tmp_path, monkeypatch, capsys):
    """A replay that cannot fit (on disk with checkpoints, in memory without) is refused right after check_args:
    no env is built and no runs/ folder is made."""
    import alm

    def no_env(*a, **k):
        raise AssertionError("an env was built before the replay's size was checked")

    monkeypatch.setattr(alm, "make_env", no_env)
    monkeypatch.setattr(alm, "make_vector_env", no_env)
    monkeypatch.chdir(tmp_path)
    for every in (10_000, 0):
        with pytest.raises(SystemExit) as exit_:
            main(Args(env_id="InvertedPendulum-v5", buffer_size=10**13, checkpoint_every=every))
        assert exit_.value.code == 2 and "--buffer-size 10000000000000" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_update_and_acting_create_no_tensor_off_the_parameters_device(one_thread):
    """GPU safety without a GPU: the agent built on the CPU, then two updates (with the non-finite record) and a few
    acting steps under torch.device("meta"): a tensor made without device= would land on meta and fail."""
    import alm

    a = Args(**TINY)
    nets, optims, groups = alm.build_agent(a, 3, 2, -np.ones(2, np.float32), np.ones(2, np.float32),
                                           torch.device("cpu"))
    agent, first = nets["agent"], None
    batches = [(fake_windows(3, 2, 8, 4, seed=i), fake_windows(3, 2, 8, 2, seed=i + 2)) for i in range(2)]
    with torch.device("meta"):
        for u, (seq, batch) in enumerate(batches):
            metrics = update(agent, optims, groups, seq, batch, 0.5, a)
            first = alm.track_non_finite(metrics, first, u + 1)
        actions = [alm_act(agent, torch.zeros(n, 3, device="cpu"), std, det) for n, std, det in
                   ((1, 0.5, False), (4, 0.1, False), (1, 0.0, True))]
    assert all(v.device.type == "cpu" and torch.isfinite(v) for v in metrics.values())
    assert first.device.type == "cpu" and alm.non_finite_message(list(metrics), first, 2) is None
    assert [x.shape for x in actions] == [(1, 2), (4, 2), (1, 2)] and all(x.device.type == "cpu" for x in actions)


# ---------------------------------------------------------------------------------------------------
# Values and stop-gradients of every update phase (each test catches a one-line mutation of alm.py)


def perturbed_agent(seed=0):
    """A tiny agent whose target encoder differs from the online one (so swapping them shows)."""
    agent = tiny_agent(seed=seed)
    with torch.no_grad():
        for p in agent.encoder_target.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return agent


def test_representation_loss_equals_hand_rollout(monkeypatch):
    """Eq. 7 with sampling patched to the mean: KL(m(z_t, a_t) || e_targ(s_{t+1})) with the buffer's a_t,
    the model's mean as the next latent, and min Q(z_K, pi(z_K)) at the end."""
    import alm

    torch.set_num_threads(1)
    monkeypatch.setattr(alm, "sample", lambda mean, std: mean)
    agent, g = perturbed_agent(), torch.Generator().manual_seed(0)
    obs, act = torch.randn(5, 4, 3, generator=g), torch.rand(5, 4, 2, generator=g) * 2 - 1
    loss, _ = representation_loss(agent, obs, act, torch.zeros(5, 4, dtype=torch.bool), 0.0, 0.3)
    with torch.no_grad():
        z, total = agent.encoder(obs[:, 0])[0], 0.0
        for t in range(3):
            mean, std = agent.model(z, act[:, t])
            tmean, tstd = agent.encoder_target(obs[:, t + 1])
            kl = td.kl_divergence(td.Independent(td.Normal(mean, std), 1), td.Independent(td.Normal(tmean, tstd), 1))
            total = total + agent.predict_reward(z, act[:, t]) - kl
            z = mean
        total = total + torch.min(*agent.critic(z, agent.actor(z, 0.0)[0]))
    assert torch.allclose(loss, -total.mean(), atol=1e-5)


def test_classifier_labels_encoder_latents_positive_model_latents_negative():
    """Eq. 9: after a short training on separable data, z' from e_targ (the real next latent) gets positive
    log-odds and z' from the model negative ones."""
    torch.set_num_threads(1)
    agent = tiny_agent()
    opt = torch.optim.Adam(agent.classifier.parameters(), 1e-2)
    for _ in range(60):  # real z' around +2, model z' around -2
        z, a = torch.randn(64, 4), torch.rand(64, 2) * 2 - 1
        loss, _ = reward_classifier_loss(agent, z, a, torch.zeros(64), torch.randn(64, 4) + 2, torch.randn(64, 4) - 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    z, a = torch.randn(256, 4), torch.rand(256, 2) * 2 - 1
    assert log_odds(agent.classify(z, a, torch.randn(256, 4) + 2)).mean() > 1
    assert log_odds(agent.classify(z, a, torch.randn(256, 4) - 2)).mean() < -1


def test_critic_target_uses_target_net_and_terminal_flag():
    """Eq. 10: y = r + gamma (1 - d) min Q_targ(z', a'); constant heads: target 7, online 3."""
    torch.set_num_threads(1)
    agent = perturbed_agent()
    with torch.no_grad():
        for net, value in ((agent.critic_target, 7.0), (agent.critic, 3.0)):
            for q in (net.q1, net.q2):
                q[-1].weight.zero_()
                q[-1].bias.fill_(value)
    z, a = torch.randn(4, 4), torch.zeros(4, 2)
    r, d = torch.tensor([1.0, 1.0, 2.0, 2.0]), torch.tensor([0.0, 1.0, 0.0, 1.0])
    loss, _ = critic_loss(agent, z, a, r, torch.randn(4, 4), d, 0.5, 0.3, 0.9)
    assert torch.allclose(loss, ((3.0 - (r + 0.9 * (1 - d) * 7.0)) ** 2).mean())


def test_actor_gets_no_gradient_through_q_action_input():
    """Official code: Q(z_t, sg(a_t)). With every other path from the actions cut, the actor gets zero gradient."""
    torch.set_num_threads(1)
    agent = perturbed_agent()
    with torch.no_grad():  # the model ignores its action input; reward and classifier heads are constant
        agent.model.net[0].weight[:, TINY["latent_dim"]:].zero_()
        agent.reward[-1].weight.zero_()
        agent.classifier[-1].weight.zero_()
    loss, _ = policy_loss(agent, torch.randn(8, 4), 0.5, 0.3, 0.99, 0.95, 3, 0.1)
    grads = torch.autograd.grad(loss, list(agent.actor.parameters()), allow_unused=True, materialize_grads=True,
                                retain_graph=True)
    assert all(g.abs().max() == 0 for g in grads)
    loss.backward()  # sanity: Q(z_t, .) still sends gradient through z_t into the model's samples
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.model.parameters())


def test_optimizer_groups_disjoint_and_model_group_is_encoder_plus_model():
    agent = tiny_agent()
    _, groups = make_optimizers(agent, 1e-3)
    ids = {k: [id(p) for p in v] for k, v in groups.items()}
    flat = [i for v in ids.values() for i in v]
    assert len(flat) == len(set(flat))  # disjoint
    assert set(ids["model"]) == {id(p) for p in [*agent.encoder.parameters(), *agent.model.parameters()]}
    assert set(ids["reward"]) == {id(p) for p in [*agent.reward.parameters(), *agent.classifier.parameters()]}
    assert set(ids["critic"]) == {id(p) for p in agent.critic.parameters()}
    assert set(ids["actor"]) == {id(p) for p in agent.actor.parameters()}
    targets = {id(p) for p in [*agent.encoder_target.parameters(), *agent.critic_target.parameters()]}
    assert not targets & set(flat)


def test_update_rest_reads_target_encoder_latents(monkeypatch):
    """App. D: reward, classifier, critic and actor losses see z = e_targ(s), z' = e_targ(s') (means here)."""
    import alm

    torch.set_num_threads(1)
    monkeypatch.setattr(alm, "sample", lambda mean, std: mean)
    seen = {}

    def spy(agent, z, a, r, z_next, *rest):
        seen.update(z=z.clone(), z_next=z_next.clone())
        return reward_classifier_loss(agent, z, a, r, z_next, *rest)

    monkeypatch.setattr(alm, "reward_classifier_loss", spy)
    agent = perturbed_agent()
    optims, groups = make_optimizers(agent, 1e-3)
    seq, batch = fake_windows(3, 2, 8, 4), fake_windows(3, 2, 8, 2, seed=1)
    with torch.no_grad():
        z, z_next = agent.encoder_target(batch["obs"][:, 0])[0], agent.encoder_target(batch["obs"][:, 1])[0]
    update(agent, optims, groups, seq, batch, 0.5, Args(**TINY))
    assert torch.allclose(seen["z"], z) and torch.allclose(seen["z_next"], z_next)


def test_actions_live_in_the_env_box_with_straight_through_clamp():
    """[official code] TruncatedNormal(low, high): noise std and clip are in env units (no rescaling of a
    [-1, 1] action onto Humanoid's +-0.4 box); the clamp into [low + 1e-6, high - 1e-6] is straight-through."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    agent = Agent(3, 2, 4, 16, 16, action_low=np.full(2, -0.4, np.float32), action_high=np.full(2, 0.4, np.float32))
    z = torch.randn(500, 4)
    torch.manual_seed(1)
    mean, a = agent.actor(z, 0.2, 0.3)
    torch.manual_seed(1)
    noise = (torch.randn(500, 2) * 0.2).clamp(-0.3, 0.3)
    assert torch.allclose(a, (mean + noise).clamp(-0.4 + 1e-6, 0.4 - 1e-6))
    assert (a.abs() < 0.4).all() and (a.abs() > 0.39).any() and (mean.abs() > 0.4).any()
    # straight-through: d a / d mean = 1, also where the sample is clamped
    ga = torch.autograd.grad(a.sum(), list(agent.actor.net.parameters()), retain_graph=True)
    gm = torch.autograd.grad(mean.sum(), list(agent.actor.net.parameters()))
    assert all(torch.allclose(x, y) for x, y in zip(ga, gm))
    obs = torch.randn(500, 3)  # the evaluation mean is clamped into the box
    assert (alm_act(agent, obs, 0.0, True).abs() <= 0.4).all()


# ---------------------------------------------------------------------------------------------------
# Checkpoints, --resume and --eval-checkpoint (issue 13)


def obs_rows(run_dir, rows, obs_dim=4):
    """The first `rows` replay rows of stream 0 of a run's memory-mapped observations (InvertedPendulum: 4 dims)."""
    return np.fromfile(os.path.join(run_dir, "replay", "obs.bin"), np.float32).reshape(1, -1, obs_dim)[:, :rows]


def test_resume_and_eval_checkpoint_cli(tmp_path):
    """A finished run continues with a larger --total-timesteps from its end-of-run checkpoint (replay rows kept,
    counters continued: one update per env step, the log schedule without a gap or a repeat, no temporary file);
    --eval-checkpoint prints its JSON line; bad input gives one error line naming the flag or the file."""
    flags = {**CLI_TINY, "total_timesteps": 160, "eval_every": 80, "log_every": 40}
    final, run_dir, _ = smoke_run_cli("alm.py", tmp_path, flags)
    ck = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    rows = ck["replay"]["count"]
    assert ck["loop"]["global_step"] == 160 and ck["loop"]["updates"] == final["updates"] == 160 - 80 + 1
    assert (ck["loop"]["next_log"], ck["loop"]["next_eval"]) == (200, 240) and rows > 160
    before = obs_rows(run_dir, rows)
    out = resume_cli("alm.py", tmp_path, final["run_dir"], "--total-timesteps", "240")
    assert f"resumed {final['run_dir']} at frame 160 after {final['updates']} updates (replay {rows} steps)" \
        in out["stdout"]
    assert out["final"]["global_step"] == 240 and out["final"]["updates"] == final["updates"] + 80  # UTD 1
    assert "resumed at frame 160, wall time" in out["stdout"] and "warm-up of" not in out["stdout"]
    np.testing.assert_array_equal(obs_rows(run_dir, rows), before)
    assert not glob.glob(os.path.join(run_dir, "*.tmp")) and not glob.glob(os.path.join(run_dir, "replay", "*.tmp"))
    ea = events(run_dir)
    assert [e.step for e in ea.Scalars("charts/SPS")] == [40, 80, 120, 160, 200, 240]
    assert [e.step for e in ea.Scalars("eval/episodic_return")] == [80, 160, 240]  # one point per step
    ck = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert ck["loop"]["global_step"] == 240 and ck["loop"]["updates"] == final["updates"] + 80
    assert ck["args"]["total_timesteps"] == 240 and ck["args"]["latent_dim"] == 8  # the saved flags were the defaults
    path = os.path.join(final["run_dir"], "checkpoint.pt")
    ev = eval_checkpoint_cli("alm.py", tmp_path, path, "--eval-episodes", "2")
    assert ev["global_step"] == 240 and ev["checkpoint"] == path and len(ev["eval_returns"]) == 2
    assert ev["eval_return"] == pytest.approx(np.mean(ev["eval_returns"])) and min(ev["eval_returns"]) >= 1
    assert "video" not in ev
    # bad input: a changed model flag, another env, a run that is already that long, a missing run dir, a
    # truncated file, a checkpoint of another script
    assert_cli_error("alm.py", tmp_path, ["--resume", final["run_dir"], "--total-timesteps", "400", "--latent-dim",
                                          "4"], "--latent-dim 4", "checkpoint's 8")
    assert_cli_error("alm.py", tmp_path, ["--resume", final["run_dir"], "--total-timesteps", "400", "--env-id",
                                          "Hopper-v5"], "--env-id Hopper-v5", "InvertedPendulum-v5")
    # a finished run (also one killed between its last checkpoint and its JSON line) prints that line again
    again = resume_cli("alm.py", tmp_path, os.path.join(final["run_dir"], "checkpoint.pt"))
    assert again["final"] == {**ck["loop"]["summary"], "run_dir": final["run_dir"]}
    assert again["final"]["global_step"] == 240 and "[train]" not in again["stdout"]
    assert resume_cli("alm.py", tmp_path, final["run_dir"], "--total-timesteps", "200")["final"] == again["final"]
    assert_cli_error("alm.py", tmp_path, ["--resume", "no/such/dir"], "--resume no/such/dir: no such run directory "
                     "(give the run's folder, e.g. runs/NAME)")
    bad = truncated_copy(os.path.join(run_dir, "checkpoint.pt"), tmp_path / "bad.pt")
    assert_cli_error("alm.py", tmp_path, ["--eval-checkpoint", str(bad)], "truncated or corrupt", "bad.pt")
    other = tmp_path / "other.pt"
    torch.save({"script": "dreamerv3.py", "args": {"env_id": "walker-walk"}, "loop": {"global_step": 5}}, other)
    assert_cli_error("alm.py", tmp_path, ["--eval-checkpoint", str(other)], "other.pt", "of dreamerv3.py",
                     "not of alm.py")


def test_update_after_restore_equals_the_uninterrupted_update(tmp_path, one_thread):
    """Save after two updates, make a third; a fresh agent (other init) restored from the checkpoint, with the
    replay reopened from its files, draws the same batches and makes exactly the same third update: metrics,
    every parameter and buffer (target encoder and target critic included) and every Adam state."""
    import alm

    a = Args(**TINY)
    N, S, A, K, std = 2, 3, 2, a.horizon, 0.5
    rng = np.random.default_rng(0)

    def agent(seed):
        torch.manual_seed(seed)
        nets, optims, groups = alm.build_agent(a, S, A, -np.ones(A, np.float32), np.ones(A, np.float32),
                                               torch.device("cpu"))
        return nets, optims, groups, ReplayBuffer(200, N, (S,), A, obs_dtype=np.float32, seed=a.seed,
                                                  path=str(tmp_path / "replay"), resume=seed != 0)

    def step(nets, optims, groups, replay):
        seq = {k: torch.as_tensor(v) for k, v in replay.sample(a.batch_size, K + 1, within_episode=True).items()}
        batch = {k: torch.as_tensor(v) for k, v in replay.sample(a.batch_size, 2, within_episode=True).items()}
        return update(nets["agent"], optims, groups, seq, batch, std, a)

    nets, optims, groups, replay = agent(0)
    for t in range(40):
        replay.add(rng.normal(size=(N, S)).astype(np.float32), rng.uniform(-1, 1, (N, A)).astype(np.float32),
                   rng.normal(size=N).astype(np.float32), np.full(N, t in (0, 17)), np.full(N, t == 16))
    for _ in range(2):
        step(nets, optims, groups, replay)
    path = str(tmp_path / "checkpoint.pt")
    alm.save_checkpoint(path, a, nets, optims, {"global_step": 80}, replay)
    m1 = step(nets, optims, groups, replay)
    nets2, optims2, groups2, replay2 = agent(1)
    assert not torch.equal(nets2["agent"].encoder.net[0].weight, nets["agent"].encoder.net[0].weight)
    ck = alm.load_checkpoint(path, "--resume", a)
    assert alm.restore_checkpoint(ck, nets2, optims2, replay2) == {"global_step": 80}
    m2 = step(nets2, optims2, groups2, replay2)
    assert {k: v.item() for k, v in m1.items()} == {k: v.item() for k, v in m2.items()}
    sd1, sd2 = nets["agent"].state_dict(), nets2["agent"].state_dict()
    assert sd1.keys() == sd2.keys() and any(k.startswith("encoder_target.") for k in sd1)
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k
    assert not torch.equal(sd1["encoder_target.net.0.weight"], sd1["encoder.net.0.weight"])  # the targets moved
    for k in optims:
        s1, s2 = optims[k].state_dict()["state"], optims2[k].state_dict()["state"]
        assert s1.keys() == s2.keys() and all(torch.equal(s1[i][j], s2[i][j]) for i in s1 for j in s1[i]), k
        assert all(int(s["step"]) == 3 for s in s1.values())
    # the restored optimisers still drive the restored parameters (not copies of them)
    assert all(p is q for p, q in zip(groups2["actor"], nets2["agent"].actor.parameters()))
    assert optims2["actor"].param_groups[0]["params"][0] is groups2["actor"][0]


def test_eval_env_generator_continues_the_evaluation_episodes():
    """The evaluation env is reset without a seed, so its generator is part of a checkpoint: a new env whose
    generator is set to the saved state starts the same episodes as the old one would have."""
    import alm
    from common.envs import make_env

    env = make_env("InvertedPendulum-v5", 11)
    env.reset()
    state = env.np_random.bit_generator.state
    expected = [env.reset()[0] for _ in range(3)]
    fresh = make_env("InvertedPendulum-v5", 11)
    assert not np.array_equal(fresh.reset()[0], expected[0])
    fresh.np_random.bit_generator.state = state
    np.testing.assert_array_equal(np.stack([fresh.reset()[0] for _ in range(3)]), np.stack(expected))
    env.close(), fresh.close()


def test_sigkill_after_first_checkpoint_then_resume(tmp_path):
    """SIGKILL right after the first checkpoint appears; --resume continues from the checkpoint's step to the final
    JSON line, with the replay rows written before the checkpoint intact, no temporary file left, and every
    TensorBoard series on its schedule without a gap or a repeated step."""
    flags = {**CLI_TINY, "total_timesteps": 280, "eval_every": 10**6, "log_every": 40, "checkpoint_every": 120}
    run_dir, ck = kill_after_first_checkpoint("alm.py", tmp_path, flags)
    saved, rows, updates = ck["loop"]["global_step"], ck["replay"]["count"], ck["loop"]["updates"]
    assert saved == 120 and rows > 0 and updates == 120 - 80 + 1
    before = obs_rows(run_dir, rows)
    out = resume_cli("alm.py", tmp_path, run_dir)
    assert f"at frame {saved} after {updates} updates" in out["stdout"]
    assert out["final"]["global_step"] == 280 and out["final"]["updates"] == updates + 280 - saved
    np.testing.assert_array_equal(obs_rows(run_dir, rows), before)
    assert not glob.glob(os.path.join(run_dir, "*.tmp")) and not glob.glob(os.path.join(run_dir, "replay", "*.tmp"))
    ea = events(run_dir)
    assert [e.step for e in ea.Scalars("charts/SPS")] == list(range(40, 281, 40))  # the points at 120 kept
    for tag in ea.Tags()["scalars"]:
        steps = [e.step for e in ea.Scalars(tag)]
        assert steps == sorted(set(steps)), (tag, steps)  # TensorBoard continues without duplicated points
    assert [e.step for e in ea.Scalars("eval/episodic_return")] == [280]
