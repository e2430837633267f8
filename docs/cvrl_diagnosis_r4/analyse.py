"""CVRL finger-spin seed 1 (commit ae4841d): load the final checkpoint, probe reward head, gradient paths,
value targets, actor entropy, SAC. Run: cd /tmp/cvrl_inv && OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE nice -n 5
~/venv/bin/python analyse.py"""
import sys, math
sys.path.insert(0, '/tmp/cvrl_inv/code')  # git archive ae4841d cvrl.py common
import numpy as np, torch
import cvrl
from common.replay import ReplayBuffer

torch.set_num_threads(1)
torch.manual_seed(0)
ck = torch.load('/tmp/cvrl_inv/run/checkpoint.pt', map_location='cpu', weights_only=True)
args = cvrl.Args(**{k: v for k, v in ck['args'].items() if k in cvrl.Args.__dataclass_fields__})
dev = torch.device('cpu')
agent, opts, mpc = cvrl.build_agent(args, (3, 64, 64), 2, dev)
cvrl.load_nets(ck, agent)
for k, sd in zip(cvrl.OPTIMISERS, ck['opts']):
    opts[k].load_state_dict(sd)
wm, actor, value, sac = agent.wm, agent.actor, agent.value, agent.sac
replay = ReplayBuffer(args.buffer_size, 1, (3, 64, 64), 2, seed=123, path='/tmp/cvrl_inv/run/replay', resume=True)
replay.load_state_dict(ck['replay'])
replay.rng = np.random.default_rng(123)  # own sampling RNG
n = replay.count
print(f'replay rows {n}; log temperature {sac.log_temperature.item():.4f} (temp {sac.log_temperature.exp().item():.4f})')

def to_t(b):
    return {k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in b.items()}

# ---------------------------------------------------------------- 2. reward head over the whole replay
# non-overlapping windows of T=32 from the zero state (as training sees them), every row once
T = args.batch_length
R, P, FEAT, AGE = [], [], [], []
with torch.no_grad():
    for s in range(0, n - T + 1, T * 50):
        starts = np.arange(s, min(s + T * 50, n - T + 1), T)
        idx = starts[:, None] + np.arange(T)
        b = to_t(dict(obs=replay.obs[0, idx], action=replay.action[0, idx], reward=replay.reward[0, idx],
                      is_first=replay.is_first[0, idx], is_terminal=replay.is_terminal[0, idx]))
        embed = wm.encoder(b['obs'])
        deter, stoch, post, prior = wm.rssm.observe(embed, b['action'], b['is_first'])
        feat = cvrl.feature(deter, stoch)
        R.append(b['reward'].flatten()); P.append(wm.reward(feat)[..., 0].flatten()); AGE.append(torch.as_tensor(idx).flatten())
        FEAT.append(feat.flatten(0, 1))
R, P, AGE, FEAT = torch.cat(R), torch.cat(P), torch.cat(AGE), torch.cat(FEAT)
pos = R > 0
def rstats(mask, name):
    r, p = R[mask], P[mask]
    mse, mse0 = ((p - r) ** 2).mean().item(), ((r.mean() - r) ** 2).mean().item()
    corr = np.corrcoef(r.numpy(), p.numpy())[0, 1] if r.std() > 0 else float('nan')
    print(f'{name}: steps {mask.sum().item()}, r>0 {(r > 0).sum().item()}, corr {corr:.3f}, MSE {mse:.5f}, '
          f'MSE(mean predictor) {mse0:.5f}, R^2 {1 - mse / mse0:.3f}')
rstats(torch.ones_like(pos), 'all rows (posterior, 32-step windows)')
rstats(AGE < n // 2, 'older half of replay')
rstats(AGE >= n // 2, 'newer half of replay')
print(f'pred on r=0 steps: mean {P[~pos].mean():.4f} std {P[~pos].std():.4f} max {P[~pos].max():.3f}; '
      f'pred on r=1: mean {P[R == 1].mean():.3f} (min {P[R == 1].min():.3f} max {P[R == 1].max():.3f}); '
      f'pred on r=2: mean {P[R == 2].mean():.3f} (min {P[R == 2].min():.3f} max {P[R == 2].max():.3f})')
print(f'replay mean reward {R.mean():.5f}; steps with pred > 0.5: {(P > 0.5).sum().item()} '
      f'(of which r>0: {((P > 0.5) & pos).sum().item()})')
# ranking: how well does pred separate r>0 from r=0? (AUC)
from scipy.stats import rankdata
rk = rankdata(P.numpy()); npos, nneg = pos.sum().item(), (~pos).sum().item()
print(f'AUC(pred, r>0) = {(rk[pos.numpy()].sum() - npos * (npos + 1) / 2) / (npos * nneg):.3f}')

# reward head on the training-style random batches (replay.sample), 8 batches
mse_l, mse0_l, c_l, np_l = [], [], [], []
with torch.no_grad():
    for i in range(8):
        b = to_t(replay.sample(args.batch_size, T))
        loss, m, (deter, stoch) = cvrl.world_model_loss(wm, b, args.free_nats, args.kl_scale)
        p = wm.reward(cvrl.feature(deter, stoch))[..., 0]
        r = b['reward']
        mse_l.append(((p - r) ** 2).mean().item()); mse0_l.append(((r - r.mean()) ** 2).mean().item()); np_l.append((r > 0).sum().item())
        print(f'  batch {i}: r>0 steps {np_l[-1]}, MSE {mse_l[-1]:.5f}, MSE(mean) {mse0_l[-1]:.5f}, '
              f'kl {m["losses/kl"]:.3f} infonce {m["losses/infonce"]:.3f} reward_loss {m["losses/reward"]:.5f}')

# ---------------------------------------------------------------- 3. gradient paths of one update
b = to_t(replay.sample(args.batch_size, T))
groups = {'encoder': wm.encoder, 'rssm.img_in+gru': [wm.rssm.img_in, wm.rssm.gru], 'rssm.img_out(prior)': wm.rssm.img_out,
          'rssm.obs_out(post)': wm.rssm.obs_out, 'reward_head': wm.reward, 'contrast': wm.contrast,
          'actor': actor, 'value': value, 'sac.q': sac.q, 'log_temp': None}
def params_of(g):
    if g is None: return [sac.log_temperature]
    mods = g if isinstance(g, list) else [g]
    return [p for m in mods for p in m.parameters()]
def gnorms(loss, name, only=None):
    out = {}
    for gname, g in groups.items():
        if only is not None and gname not in only: continue
        ps = [p for p in params_of(g) if p.requires_grad]
        if not ps:
            out[gname] = 'frozen'; continue
        gr = torch.autograd.grad(loss, ps, retain_graph=True, allow_unused=True)
        out[gname] = math.sqrt(sum((x ** 2).sum().item() for x in gr if x is not None)) if any(x is not None for x in gr) else None
    print(f'{name:38s} ' + '  '.join(f'{k}={(v if isinstance(v, str) else "None" if v is None else f"{v:.2e}")}' for k, v in out.items()))
    return out

obs = b['obs']
embed = wm.encoder(obs)
deter, stoch, post, prior = wm.rssm.observe(embed, b['action'], b['is_first'])
feat = cvrl.feature(deter, stoch)
reward_loss = (0.5 * (wm.reward(feat)[..., 0] - b['reward']) ** 2).mean()
kl = cvrl.gaussian_kl(post, prior).mean()
kl_term = torch.clamp(kl, min=args.free_nats)
nce = wm.contrast(feat, embed).mean()
print(f'\none batch: kl {kl.item():.4f} (free nats {args.free_nats}: clamp active -> zero KL gradient: {kl.item() < args.free_nats}), '
      f'reward_loss {reward_loss.item():.5f}, -nce {-nce.item():.4f}, r>0 steps {(b["reward"] > 0).sum().item()}')
wm_only = [k for k in groups if k not in ('actor', 'value', 'sac.q', 'log_temp')]
gnorms(reward_loss, 'reward loss', wm_only)
gnorms(kl_term, 'KL term (clamped, as trained)', wm_only)
gnorms(kl, 'KL unclamped (for scale)', wm_only)
gnorms(-nce, 'InfoNCE term', wm_only)
model_loss = reward_loss + kl_term - nce
gnorms(model_loss, 'model loss (total)', wm_only)
# per-KL-sample: fraction of (b,t) with KL above 3
klbt = cvrl.gaussian_kl(post, prior)
print(f'KL per (b,t): mean {klbt.mean():.3f} median {klbt.median():.3f} p10 {klbt.quantile(0.1):.3f} p90 {klbt.quantile(0.9):.3f}; '
      f'post std mean {post[1].mean():.3f} prior std mean {prior[1].mean():.3f}')

# behaviour losses, exactly as update() does it (wm frozen), then per path
deter_d, stoch_d = deter.detach().flatten(0, 1), stoch.detach().flatten(0, 1)
wm.requires_grad_(False)
torch.manual_seed(1)
actor_loss, value_loss, bm = cvrl.behaviour_loss(wm, actor, value, deter_d, stoch_d, args.imag_horizon, args.gamma, args.lam)
print('behaviour metrics', {k: round(v.item(), 4) for k, v in bm.items()})
gnorms(actor_loss, 'Dreamer actor loss', ['actor', 'value', 'reward_head', 'encoder'])
gnorms(value_loss, 'value loss', ['actor', 'value'])
# decompose the Dreamer actor gradient: through the reward head vs through the value net
torch.manual_seed(1)
fi, ai = cvrl.imagine(wm.rssm, lambda f, t: actor(f.detach())[0], deter_d, stoch_d, args.imag_horizon)
rw, vv = wm.reward(fi)[..., 0], value(fi)[..., 0]
disc = args.gamma ** torch.arange(args.imag_horizon - 1, dtype=torch.float32)[:, None]
ret_r = cvrl.lambda_return(rw[:-1], vv.detach(), args.gamma, args.lam)
ret_v = cvrl.lambda_return(rw[:-1].detach(), vv, args.gamma, args.lam)
ga_r = gnorms(-(disc * ret_r[1:]).mean(), 'actor loss via reward head only', ['actor'])
ga_v = gnorms(-(disc * ret_v[1:]).mean(), 'actor loss via value net only', ['actor'])
# check lambda_return against A.2's explicit (1-lam) sum lam^{n-1} V_N^n + lam^{H-1} V_N^H on a few starts
with torch.no_grad():
    H = args.imag_horizon; g, lam = args.gamma, args.lam
    r_, v_ = rw[:, :5].detach(), vv[:, :5].detach()
    rec = cvrl.lambda_return(r_[:-1], v_, g, lam)[0]
    def VN(k):  # from tau=0: sum_{n=0}^{h-1} g^n r_n + g^h v_h, h = min(k, H)
        h = min(k, H)
        return sum(g ** j * r_[j] for j in range(h)) + g ** h * v_[h]
    expl = (1 - lam) * sum(lam ** (k - 1) * VN(k) for k in range(1, H)) + lam ** (H - 1) * VN(H)
    print(f'lambda_return recursion vs A.2 explicit (5 starts): max abs diff {(rec - expl).abs().max():.2e}')
    print(f'imagined: reward mean {rw.mean():.4f} max {rw.max():.3f}; value mean {vv.mean():.3f} (min {vv.min():.3f} max {vv.max():.3f}); '
          f'V_lambda(s_1) mean {cvrl.lambda_return(rw[:-1], vv, g, lam)[1].mean():.3f}')
    print(f'imagined per-step reward by tau: ' + ' '.join(f'{x:.4f}' for x in rw.mean(1).tolist()))
    print(f'value by tau: ' + ' '.join(f'{x:.3f}' for x in vv.mean(1).tolist()))
# SAC losses as in update()
q_loss, sac_actor_loss, temp_loss, sm = cvrl.sac_losses(sac, actor, cvrl.feature(deter, stoch).detach(), b, args.gamma)
print('SAC metrics', {k: round(float(v), 4) for k, v in sm.items()})
ga_s = gnorms(args.hybrid_alpha * sac_actor_loss, 'SAC actor loss (alpha=1)', ['actor', 'sac.q', 'value'])
gnorms(q_loss, 'SAC Q loss', ['actor', 'sac.q'])
gnorms(temp_loss, 'SAC temperature loss', ['log_temp', 'actor'])
tot = actor_loss + args.hybrid_alpha * sac_actor_loss
ga_t = gnorms(tot, 'actor loss total (Dreamer + SAC)', ['actor'])
# cosine between Dreamer and SAC actor gradients
gd = torch.autograd.grad(actor_loss, list(actor.parameters()), retain_graph=True)
gs = torch.autograd.grad(sac_actor_loss, list(actor.parameters()), retain_graph=True)
fl = lambda gg: torch.cat([x.flatten() for x in gg])
print(f'cos(Dreamer actor grad, SAC actor grad) = {torch.nn.functional.cosine_similarity(fl(gd), fl(gs), 0):.3f}')
wm.requires_grad_(True)

# the real update() on a copy: which parameter groups receive gradient
import copy
agent2 = copy.deepcopy(agent)
opts2 = {k: type(o)(p, lr=o.defaults['lr'], eps=o.defaults['eps']) for (k, o), p in zip(opts.items(),
         [agent2.wm.parameters(), agent2.value.parameters(), agent2.actor.parameters(), agent2.sac.trainable()])}
for k, sd in zip(cvrl.OPTIMISERS, ck['opts']):
    opts2[k].load_state_dict(sd)
# capture grads just before the optimiser step by wrapping step
captured = {}
for name, o in opts2.items():
    def mk(name, o, orig):
        def step(*a, **kw):
            captured[name] = math.sqrt(sum((p.grad ** 2).sum().item() for g in o.param_groups for p in g['params'] if p.grad is not None))
            captured[name + '_n_with_grad'] = sum(p.grad is not None for g in o.param_groups for p in g['params'])
            captured[name + '_n'] = sum(1 for g in o.param_groups for p in g['params'])
            return orig(*a, **kw)
        return step
    o.step = mk(name, o, o.step)
um = cvrl.update(agent2, opts2, b, args)
print('update(): grads at step', captured)
print('update() metrics grad_norm', {k: round(float(v), 4) for k, v in um.items() if k.startswith('grad_norm')})

# ---------------------------------------------------------------- actor entropy / std on replay states
with torch.no_grad():
    mean, std = actor.dist(FEAT)
    print(f'actor on {FEAT.shape[0]} replay posterior states: pre-tanh |mean| {mean.abs().mean():.3f} '
          f'(frac |mean|>2: {(mean.abs() > 2).float().mean():.3f}), std mean {std.mean():.4f} median {std.median():.4f} '
          f'min {std.min():.2e} max {std.max():.3f}')
    a, logp = actor(FEAT)
    print(f'tanh-Gaussian entropy estimate -E[log pi] {-logp.mean():.3f} (target -|A| = -2); |a| mean {a.abs().mean():.3f}, '
          f'frac |a|>0.99 {(a.abs() > 0.99).float().mean():.3f}; mode |tanh(mean)| {torch.tanh(mean).abs().mean():.3f}')
    # value vs Monte-Carlo discounted return along replay (row t: V(s_t) ~ sum_k gamma^k r_{t+k}, Dreamer's reward-at-arrival convention)
    vrep = value(FEAT)[..., 0]
    Rn = R.numpy(); AGEn = AGE.numpy(); order = np.argsort(AGEn)
    r_sorted = Rn[order]; first = replay.is_first[0, AGEn[order]]
    mc = np.zeros_like(r_sorted); acc = 0.0
    for i in range(len(r_sorted) - 1, -1, -1):
        acc = r_sorted[i] + args.gamma * acc
        mc[i] = acc
        if first[i]:
            acc = 0.0
    mc_rows = np.empty_like(mc); mc_rows[order] = mc
    print(f'value on replay states: mean {vrep.mean():.3f} std {vrep.std():.3f}; MC discounted return (behaviour policy): '
          f'mean {mc_rows.mean():.3f} std {mc_rows.std():.3f}; corr {np.corrcoef(vrep.numpy(), mc_rows)[0, 1]:.3f}')
    # Q on replay actions
    sa = torch.cat([FEAT, torch.as_tensor(replay.action[0, AGEn])], -1)
    q = torch.minimum(sac.q[0](sa), sac.q[1](sa))[..., 0]
    print(f'min Q on replay (s,a): mean {q.mean():.3f} std {q.std():.3f}; corr with MC {np.corrcoef(q.numpy(), mc_rows)[0, 1]:.3f}')

# ---------------------------------------------------------------- MPC: size of dV/da_0 on replay states
with torch.no_grad():
    idx = torch.randperm(FEAT.shape[0])[:256]
D = args.deter
d0, s0 = FEAT[idx, :D].clone(), FEAT[idx, D:].clone()
wm.requires_grad_(False)
acts, vals, prop = cvrl.plan(wm, actor, value, d0, s0, args.imag_horizon, args.gamma, args.lam, args.mpc_lr, 1, True)
ch = (acts - prop).abs()
print(f'MPC (lr {args.mpc_lr}, 1 step) on 256 replay states: |a0 change| mean {ch[0].mean():.2e} max {ch[0].max():.2e}; '
      f'implied |dV/da0| mean {ch[0].mean() / args.mpc_lr:.3f}; change over all H actions mean {ch.mean():.2e}; V mean {vals.mean():.3f}')
