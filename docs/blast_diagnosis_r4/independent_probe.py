"""Probe of the finger-spin BLAST run (seed 1, code ae4841d) from copies of its final checkpoint and replay.

Run (from the repository root; it was probe.py in /tmp/blast_inv when it ran):
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE nice -n 5 python docs/blast_diagnosis_r4/independent_probe.py
Needs: /tmp/blast_inv/code (git -C /work/main archive ae4841d blast.py common | tar -x -C /tmp/blast_inv/code) and
/tmp/blast_inv/run/{checkpoint.pt, replay/} (one `cp -r` of the run's checkpoint.pt and replay/).
Nothing is trained: every BatchNorm gets momentum 0 during the train-mode passes, so the running statistics stay.
"""
import copy
import sys

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, "/tmp/blast_inv/code")
import blast  # noqa: E402
from common.replay import ReplayBuffer  # noqa: E402

torch.set_num_threads(1)
RUN = "/tmp/blast_inv/run"
ck = torch.load(f"{RUN}/checkpoint.pt", map_location="cpu", weights_only=True)
args = blast.Args(**{k: v for k, v in ck["args"].items() if k in blast.Args.__dataclass_fields__})
nets, opts = blast.build_agent(args, (3, 64, 64), 2, False, torch.device("cpu"))
loop = blast.restore_checkpoint(ck, nets, opts)
wm, actor, critic, slow = nets["wm"], nets["actor"], nets["critic"], nets["slow_critic"]
print(f"checkpoint: frame {loop['global_step']}, updates {loop['updates']}; deter {args.deter} stoch {args.stoch}x"
      f"{args.classes} ar_steps {args.ar_steps} kl_free {args.kl_free} target_ema {args.target_ema}")
bns = [m for m in wm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
for m in bns:
    m.momentum = 0.0  # train-mode passes use batch statistics but leave the running statistics alone
SAVED = copy.deepcopy(wm.state_dict())

replay = ReplayBuffer(args.buffer_size, 1, (3, 64, 64), 2, seed=args.seed, path=f"{RUN}/replay", resume=True)
replay.load_state_dict(ck["replay"])
n = replay.count
R = np.asarray(replay.reward[0, :n], np.float64)
FIRST = np.asarray(replay.is_first[0, :n])


def sec(title):
    print(f"\n=== {title} ===", flush=True)


def auc(score, pos):
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    # average ranks of ties
    s = score[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    npos, nneg = pos.sum(), (~pos).sum()
    return (ranks[pos].sum() - npos * (npos + 1) / 2) / (npos * nneg)


# ---------------------------------------------------------------- 1. replay rewards
sec("replay")
starts = np.flatnonzero(FIRST)
ep_ret = [R[a:b].sum() for a, b in zip(starts, list(starts[1:]) + [n])]
prefill_rows = args.prefill + 1
print(f"rows {n}, episodes {len(starts)} (last partial: {n - starts[-1]} rows)")
vals, cnt = np.unique(R, return_counts=True)
print("reward values per agent step:", dict(zip(vals.tolist(), cnt.tolist())))
print(f"fraction r>0: {np.mean(R > 0):.4%} overall, {np.mean(R[:prefill_rows] > 0):.4%} in the random prefill "
      f"(first {prefill_rows} rows), {np.mean(R[prefill_rows:] > 0):.4%} after; mean r {R.mean():.5f}, var/2 {R.var() / 2:.6f}")
print("episode returns:", [int(x) for x in ep_ret])
# Monte-Carlo discounted return (gamma 0.99) of the behaviour data, per row, within episodes
MC = np.zeros(n)
for a, b in zip(starts, list(starts[1:]) + [n]):
    g = 0.0
    for t in range(b - 1, a - 1, -1):
        g = R[t] + args.gamma * g if t + 1 < b else R[t]
        MC[t] = g
# V_t for the DreamerV2 timing (value of state t includes r_t): MC[t] = r_t + gamma MC[t+1]

# ---------------------------------------------------------------- 2. windows as training builds them
T, B = args.batch_length, args.batch_size
W = n // T
win = np.arange(W * T).reshape(W, T)
# random batch companions as replay.sample draws them (consecutive windows of one episode would give BatchNorm
# unrepresentative batch statistics); the order only groups windows into batches
win = win[np.random.default_rng(0).permutation(W)]


def batch(idx):
    rows = win[idx]
    return {"obs": torch.as_tensor(replay.obs[0, rows]), "action": torch.as_tensor(replay.action[0, rows]),
            "reward": torch.as_tensor(replay.reward[0, rows]), "is_first": torch.as_tensor(replay.is_first[0, rows])}


@torch.no_grad()
def passes(data, train, encoder, seed):
    """embed, deter, stoch, post logits with the given encoder and BN mode; same Gumbel draws for one seed."""
    wm.train(train)
    torch.manual_seed(seed)
    emb = encoder(data["obs"])
    d, s, p = wm.rssm.observe(emb, data["action"], data["is_first"])
    wm.train(True)
    return emb, d, s, p


acc = {k: [] for k in ("r", "rw_on_tr", "rw_tg_tr", "rw_tg_ev", "mc", "v_ev", "vs_ev", "v_tr")}
bn_rows = []
for i0 in range(0, W - B + 1, B):  # full batches of B windows (as training), the tail of < B windows dropped
    idx = np.arange(i0, i0 + B)
    data = batch(idx)
    on_tr = passes(data, True, wm.encoder, i0)
    tg_tr = passes(data, True, wm.target_encoder, i0)
    tg_ev = passes(data, False, wm.target_encoder, i0)  # = acting (BN running statistics, per-sample)
    with torch.no_grad():
        f_on, f_tr, f_ev = (blast.feature(x[1], x[2]) for x in (on_tr, tg_tr, tg_ev))
        acc["r"].append(data["reward"].numpy().ravel())
        acc["rw_on_tr"].append(wm.reward(f_on)[..., 0].numpy().ravel())
        acc["rw_tg_tr"].append(wm.reward(f_tr)[..., 0].numpy().ravel())
        acc["rw_tg_ev"].append(wm.reward(f_ev)[..., 0].numpy().ravel())
        acc["mc"].append(MC[win[idx]].ravel())
        acc["v_ev"].append(critic(f_ev).numpy().ravel())
        acc["vs_ev"].append(slow(f_ev).numpy().ravel())
        acc["v_tr"].append(critic(f_tr).numpy().ravel())
        # BN mode comparison: train-mode (batch stats) target path, which trains the actor, vs eval mode (acting)
        e_tr, e_ev = tg_tr[0], tg_ev[0]
        lp_tr, lp_ev = torch.log_softmax(tg_tr[3], -1), torch.log_softmax(tg_ev[3], -1)
        kl_te = (lp_tr.exp() * (lp_tr - lp_ev)).sum((-2, -1))  # (B, T)
        agree = (tg_tr[3].argmax(-1) == tg_ev[3].argmax(-1)).float().mean()
        a_tr, a_ev = actor(f_tr), actor(f_ev)
        # online vs target (EMA) posterior, both train mode
        lp_on = torch.log_softmax(on_tr[3], -1)
        kl_ot = (lp_on.exp() * (lp_on - lp_tr)).sum((-2, -1))
        bn_rows.append([
            ((e_tr - e_ev).norm() / e_ev.norm()).item(),
            nn.functional.cosine_similarity(e_tr.flatten(0, 1), e_ev.flatten(0, 1), -1).mean().item(),
            ((tg_tr[1] - tg_ev[1]).norm() / tg_ev[1].norm()).item(),
            kl_te.mean().item(), agree.item(),
            (a_tr.mode - a_ev.mode).abs().mean().item(), (a_tr.std - a_ev.std).abs().mean().item(),
            kl_ot.mean().item(), (on_tr[3].argmax(-1) == tg_tr[3].argmax(-1)).float().mean().item(),
            ((on_tr[0] - tg_tr[0]).norm() / tg_tr[0].norm()).item()])
wm.load_state_dict(SAVED)
acc = {k: np.concatenate(v) for k, v in acc.items()}
r = acc["r"]
sec("reward head on replay (non-overlapping 32-step windows from the zero state, batches of 16 as training)")
for k, name in (("rw_on_tr", "online posterior, train-mode BN"), ("rw_tg_tr", "target posterior, train-mode BN"),
                ("rw_tg_ev", "target posterior, eval-mode BN (acting)")):
    p = acc[k]
    mse, mse0 = np.mean((p - r) ** 2), np.mean((r - r.mean()) ** 2)
    print(f"{name:42s}: corr {np.corrcoef(p, r)[0, 1]:.3f}  MSE {mse:.5f} vs mean-predictor {mse0:.5f} "
          f"(R^2 {1 - mse / mse0:.3f})  AUC(r>0) {auc(p, r > 0):.3f}  mean pred r=0: {p[r == 0].mean():.4f} "
          f"r=1: {p[r == 1].mean() if (r == 1).any() else np.nan:.3f} r=2: {p[r == 2].mean() if (r == 2).any() else np.nan:.3f}"
          f"  #pred>0.5: {(p > 0.5).sum()} of which r>0: {((p > 0.5) & (r > 0)).sum()}")
print(f"rows scored {len(r)}, rewarded {(r > 0).sum()}")

sec("BatchNorm: train mode (batch statistics, what the actor is trained on) vs eval mode (running statistics, acting)")
bn = np.array(bn_rows)
names = ["target embed rel. L2 diff", "target embed cosine", "deter rel. L2 diff", "KL(q_train||q_eval) nats",
         "latent argmax agreement", "|actor mode diff| (action units)", "|actor std diff|",
         "KL(q_online||q_target) nats (train)", "online/target argmax agreement", "online vs target embed rel. L2"]
for j, nm in enumerate(names):
    print(f"{nm:40s} mean {bn[:, j].mean():.4f}  min {bn[:, j].min():.4f}  max {bn[:, j].max():.4f}")

sec("BatchNorm running statistics vs the replay's batch statistics")
with torch.no_grad():
    for enc_name, enc in (("encoder", wm.encoder), ("target_encoder", wm.target_encoder)):
        data = batch(np.arange(0, W, max(1, W // 16))[:16])
        x = data["obs"].reshape(-1, 3, 64, 64).float() / 255.0 - 0.5
        for layer in enc.net:
            if isinstance(layer, nn.BatchNorm2d):
                mu, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
                print(f"{enc_name} BN({layer.num_features}): |running_mean - batch mean| / batch std "
                      f"{((layer.running_mean - mu).abs() / var.sqrt()).mean():.3f}; running_var / batch var "
                      f"median {(layer.running_var / var).median():.3f} (min {(layer.running_var / var).min():.3f}, "
                      f"max {(layer.running_var / var).max():.3f})")
                layer.eval()
                x = layer(x)
                layer.train()
            else:
                x = layer(x)
    bnp = wm.rssm.obs_out[1]
    print(f"rssm.obs_out BN running_var: median {bnp.running_var.median():.4f} min {bnp.running_var.min():.4f} "
          f"max {bnp.running_var.max():.4f}; running_mean |.| median {bnp.running_mean.abs().median():.4f}")
    # obs_out pre-BN statistics over a training batch, per time step (B = 16 states per step)
    data = batch(np.arange(16))
    wm.train(True)
    emb = wm.target_encoder(data["obs"])
    d, s, _ = wm.rssm.observe(emb, data["action"], data["is_first"])
    pre = wm.rssm.obs_out[0](torch.cat([d, emb], -1))  # (B, T, hidden)
    mu_t, var_t = pre.mean(0), pre.var(0, unbiased=False)  # per-step batch stats (B = 16)
    mu_all, var_all = pre.flatten(0, 1).mean(0), pre.flatten(0, 1).var(0)
    print(f"obs_out pre-BN: per-step batch var / pooled var median {(var_t / var_all).median():.3f}; "
          f"running_var / pooled var median {(bnp.running_var / var_all).median():.3f}; "
          f"|running_mean - pooled mean|/pooled std median {((bnp.running_mean - mu_all).abs() / var_all.sqrt()).median():.3f}")
    wm.load_state_dict(SAVED)

sec("EMA target encoder")
with torch.no_grad():
    for (nm, p_on), p_tg in zip(wm.encoder.named_parameters(), wm.target_encoder.parameters()):
        print(f"{nm:14s} |xi - theta| / |theta| = {((p_tg - p_on).norm() / p_on.norm()).item():.4f}")
    print(f"updates {loop['updates']}: EMA decay {args.target_ema} -> time constant {1 / (1 - args.target_ema):.0f} updates")

sec("critic, slow critic and Monte-Carlo returns on replay states (target posterior, eval-mode BN)")
mc = acc["mc"]
for k in ("v_ev", "vs_ev", "v_tr"):
    print(f"{k}: mean {acc[k].mean():.4f} std {acc[k].std():.4f} corr with MC {np.corrcoef(acc[k], mc)[0, 1]:.3f}")
print(f"MC discounted return of the behaviour data: mean {mc.mean():.4f} std {mc.std():.4f} max {mc.max():.2f}")

# ---------------------------------------------------------------- 3. one training update: KL, gradient paths
sec("KL, free nats and gradient paths of one update (replay.sample(16, 32) with a fresh RNG)")
rng_rep = np.random.default_rng(123)
replay.rng = rng_rep
groups = {
    "encoder": list(wm.encoder.parameters()),
    "target_encoder": list(wm.target_encoder.parameters()),
    "rssm.img_in+gru": list(wm.rssm.img_in.parameters()) + list(wm.rssm.gru.parameters()),
    "rssm.obs_out+obs_dist (posterior)": list(wm.rssm.obs_out.parameters()) + list(wm.rssm.obs_dist.parameters()),
    "prior (img_out, img_dist, ar_*)": [p for nm, p in wm.rssm.named_parameters()
                                        if nm.startswith(("img_out", "img_dist", "ar_"))],
    "reward head": list(wm.reward.parameters()),
    "decoder": list(wm.decoder.parameters()),
}


def gnorms(loss, groups, retain=True):
    out = {}
    for g, ps in groups.items():
        ps_req = [p for p in ps if p.requires_grad]
        if not ps_req:
            out[g] = "frozen"
            continue
        gr = torch.autograd.grad(loss, ps_req, retain_graph=True, allow_unused=True)
        gr = [x for x in gr if x is not None]
        out[g] = "None" if not gr else f"{torch.sqrt(sum((x ** 2).sum() for x in gr)).item():.3e}"
    return out


kls = []
for rep in range(6):
    data = {k: torch.as_tensor(v) for k, v in replay.sample(B, T).items()}
    wm.train(True)
    torch.manual_seed(rep)
    loss, met, out = blast.world_model_loss(wm, data, args.kl_balance, args.kl_free, args.kl_scale, args.reward_scale,
                                            args.image_scale, args.target_input_p, args.reconstruction,
                                            args.reward_grad)
    kl_bt = blast.categorical_kl(out["t_post"], out["prior"]).detach()  # (B, T)
    nh = int(B * (1 - args.target_input_p))
    with torch.no_grad():  # the prior run free (own samples), as in imagination
        prior_free, _ = wm.rssm.prior(out["t_deter"])
        kl_free_run = blast.categorical_kl(out["t_post"], prior_free).mean().item()
        # per-chunk (latent) KL of the teacher-forced prior
        lp, lq = torch.log_softmax(out["t_post"], -1), torch.log_softmax(out["prior"].detach(), -1)
        per_latent = (lp.exp() * (lp - lq)).sum(-1).mean((0, 1))  # (S,)
    kls.append([met["stats/kl"].item(), kl_bt[:nh].mean().item(), kl_bt[nh:].mean().item(),
                kl_bt[:, 0].mean().item(), kl_free_run, (data["reward"] > 0).sum().item()])
    if rep == 0:
        terms = {"KL term (kl_scale * clamp)": args.kl_scale * blast.kl_loss(
                     out["t_post"], out["prior"], args.kl_balance, args.kl_free)[0],
                 "reward NLL": args.reward_scale * met["losses/reward"] * 0,  # placeholder, replaced below
                 }
        # recompute the three terms as differentiable tensors (world_model_loss returns only their sum)
        feat = out["feat"]
        rew_term = blast.gaussian_nll(wm.reward(feat)[..., 0], data["reward"]).mean()
        img_term = blast.gaussian_nll(wm.decoder(feat.detach()), data["obs"].float() / 255.0 - 0.5).sum((-3, -2, -1)).mean()
        kl_term = terms["KL term (kl_scale * clamp)"]
        print(f"check: kl+reward+image = {(kl_term + rew_term + img_term).item():.4f} vs world_model_loss {loss.item():.4f}")
        for nm, term in (("KL", kl_term), ("reward", rew_term), ("image(decoder)", img_term)):
            print(f"  d({nm})/d(group): {gnorms(term, groups)}")
        # reward gradient split: online half (rows < nh) vs target half
        rew_on = blast.gaussian_nll(wm.reward(feat[:nh])[..., 0], data["reward"][:nh]).mean()
        rew_tg = blast.gaussian_nll(wm.reward(feat[nh:])[..., 0], data["reward"][nh:]).mean()
        print(f"  reward, online half only: {gnorms(rew_on, {k: groups[k] for k in ('encoder', 'rssm.img_in+gru', 'rssm.obs_out+obs_dist (posterior)')})}")
        print(f"  reward, target half only: {gnorms(rew_tg, {k: groups[k] for k in ('encoder', 'rssm.img_in+gru', 'rssm.obs_out+obs_dist (posterior)')})}")
        # KL: gradient into the target posterior logits must be zero (+SG); into the online encoder only via h_t
        t_post_leaf = out["t_post"].clone().requires_grad_(True)
        kl_chk, _ = blast.kl_loss(t_post_leaf, out["prior"], args.kl_balance, args.kl_free)
        g_tp = torch.autograd.grad(kl_chk, t_post_leaf, retain_graph=True)[0]
        print(f"  |d KL / d target-posterior logits| = {g_tp.norm().item():.3e} (0 = stop-gradient on q_xi, balance {args.kl_balance})")
        # KL gradient w.r.t. the prior logits, and whether the clamp is active
        print(f"  batch-mean KL {met['stats/kl'].item():.3f} vs free nats {args.kl_free}: clamp "
              f"{'inactive (gradient flows)' if met['stats/kl'].item() > args.kl_free else 'ACTIVE (zero KL gradient)'}")
        print(f"  world-model grad norm total {torch.sqrt(sum((g ** 2).sum() for g in torch.autograd.grad(loss, wm.model_parameters(), retain_graph=True, allow_unused=True) if g is not None)).item():.3f}")
        print(f"  per-latent KL (teacher-forced, nats): {np.round(per_latent.numpy(), 3).tolist()}")
        print(f"  prior entropy {met['stats/prior_entropy'].item():.2f} / posterior entropy {met['stats/posterior_entropy'].item():.2f} "
              f"nats (max {args.stoch * np.log(args.classes):.2f})")

        # ---- behaviour: gradient paths and imagination
        wm.requires_grad_(False)
        torch.manual_seed(100)
        a_loss, c_loss, ac_met = blast.actor_critic_loss(
            wm, actor, critic, slow, out["t_deter"].flatten(0, 1), out["t_stoch"].flatten(0, 1), args.imag_horizon,
            args.gamma, args.lam, args.actor_entropy, False)
        bgroups = {"actor": list(actor.parameters()), "critic": list(critic.parameters()),
                   "slow critic": list(slow.parameters()), "world model": wm.model_parameters()}
        print(f"  d(actor loss)/d: {gnorms(a_loss, bgroups)}")
        print(f"  d(critic loss)/d: {gnorms(c_loss, bgroups)}")
        # split the actor loss: return part vs entropy part
        torch.manual_seed(100)
        feat_i, ent_i, logp_i = blast.imagine(wm.rssm, actor, out["t_deter"].flatten(0, 1), out["t_stoch"].flatten(0, 1), args.imag_horizon)
        rew_i = wm.reward(feat_i)[..., 0]
        val_i = slow(feat_i)
        disc = torch.full_like(rew_i, args.gamma)
        ret_i = blast.lambda_return(rew_i[:-1], val_i[:-1], disc[:-1], val_i[-1], args.lam)
        w_i = torch.cumprod(torch.cat([torch.ones_like(disc[:1]), disc[:-1]]), 0)
        ret_part = -(w_i[:-2] * ret_i[1:]).mean()
        ent_part = -(w_i[:-2] * args.actor_entropy * ent_i[:-1]).mean()
        g_ret = torch.autograd.grad(ret_part, list(actor.parameters()), retain_graph=True)
        g_ent = torch.autograd.grad(ent_part, list(actor.parameters()), retain_graph=True)
        nr = torch.sqrt(sum((g ** 2).sum() for g in g_ret)).item()
        ne = torch.sqrt(sum((g ** 2).sum() for g in g_ent)).item()
        print(f"  actor grad: return part {nr:.3e}, entropy part (scale {args.actor_entropy}) {ne:.3e}; ratio ent/ret {ne / max(nr, 1e-30):.3f}")
        # return part split into the reward path and the value path
        rew_part = -(w_i[:-2] * blast.lambda_return(rew_i[:-1], 0 * val_i[:-1], disc[:-1], 0 * val_i[-1], args.lam)[1:]).mean()
        g_rew = torch.autograd.grad(rew_part, list(actor.parameters()), retain_graph=True)
        print(f"  actor grad via the reward head only: {torch.sqrt(sum((g ** 2).sum() for g in g_rew)).item():.3e}")
        with torch.no_grad():
            print(f"  imagined reward by step (mean over N): {np.round(rew_i.mean(1).numpy(), 4).tolist()}")
            print(f"  slow-critic value by step: {np.round(val_i.mean(1).numpy(), 4).tolist()}")
            print(f"  lambda-return V_0 mean {ret_i[0].mean().item():.4f}, critic v(s_0) {critic(feat_i[0]).mean().item():.4f}, "
                  f"slow v(s_0) {val_i[0].mean().item():.4f}; critic loss {c_loss.item():.4f} "
                  f"(= 0.919 x mean weight {w_i[:-1].mean().item():.4f} = {0.9189 * w_i[:-1].mean().item():.4f} + MSE part)")
            dist0 = actor(feat_i[0])
            print(f"  actor at s_0: |mode| mean {dist0.mode.abs().mean().item():.3f}, frac |mode|>0.95 "
                  f"{(dist0.mode.abs() > 0.95).float().mean().item():.3f}, std mean {dist0.std.mean().item():.3f} "
                  f"(min_std {args.actor_min_std}), entropy {dist0.entropy().mean().item():.3f}")
            # slow critic vs critic on imagined states
            print(f"  critic - slow critic on imagined states: mean |diff| {(critic(feat_i) - val_i).abs().mean().item():.4f}")
        for p in wm.model_parameters() + list(wm.decoder.parameters()):
            p.requires_grad_(True)
    wm.load_state_dict(SAVED)
k = np.array(kls)
print("\nper batch [batch-mean KL, online-half KL, target-half KL, KL at t=0, KL free-running prior, #rewarded steps]:")
for row in k:
    print("  " + "  ".join(f"{x:.3f}" for x in row))

# ---------------------------------------------------------------- 4. long imagination: actor vs random actions
sec("model-predicted reward per agent step over 200 imagined steps from 256 replay posteriors")
with torch.no_grad():
    data = batch(np.arange(0, W, W // 16)[:16])
    wm.train(True)
    emb = wm.target_encoder(data["obs"])
    d, s, _ = wm.rssm.observe(emb, data["action"], data["is_first"])
    wm.load_state_dict(SAVED)
    d0, s0 = d[:, ::2].flatten(0, 1), s[:, ::2].flatten(0, 1)  # 256 starts
    for mode in ("actor sample", "actor mode", "random"):
        torch.manual_seed(7)
        dd, ss, rs, acts = d0, s0, [], []
        for t in range(200):
            f = blast.feature(dd, ss)
            rs.append(wm.reward(f)[..., 0])
            dist = actor(f)
            a = dist.rsample() if mode == "actor sample" else dist.mode if mode == "actor mode" else torch.rand_like(dist.mean) * 2 - 1
            acts.append(a)
            dd, ss = wm.rssm.img_step(dd, ss, a)
        rs, acts = torch.stack(rs), torch.stack(acts)
        print(f"{mode:13s}: predicted r per step {rs.mean().item():.4f} (first 15: {rs[:15].mean().item():.4f}, "
              f"100-200: {rs[100:].mean().item():.4f}) -> x500 = {500 * rs.mean().item():.1f} per episode; "
              f"|a| mean {acts.abs().mean().item():.3f}, frac |a|>0.95 {(acts.abs() > 0.95).float().mean().item():.3f}")
print(f"replay reward per agent step: {R.mean():.4f}; last episodes {[int(x) for x in ep_ret[-5:]]}")
