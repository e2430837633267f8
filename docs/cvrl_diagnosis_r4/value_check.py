"""Is v(s) consistent with the model's own long-horizon predicted rewards under the actor? Roll the prior
300 steps with the actor (samples) from 512 replay posterior states; compare v(s_0) with sum_k gamma^k r(s_k)
(reward-at-arrival convention: V(s_0) = r(s_0) + gamma r(s_1) + ... as in lambda_return) + gamma^300 v(s_300)."""
import sys; sys.path.insert(0, '/tmp/cvrl_inv/code')
import numpy as np, torch, cvrl
from common.replay import ReplayBuffer
torch.set_num_threads(1); torch.manual_seed(0)
ck = torch.load('/tmp/cvrl_inv/run/checkpoint.pt', map_location='cpu', weights_only=True)
args = cvrl.Args(**{k: v for k, v in ck['args'].items() if k in cvrl.Args.__dataclass_fields__})
agent, opts, mpc = cvrl.build_agent(args, (3, 64, 64), 2, torch.device('cpu')); cvrl.load_nets(ck, agent)
wm, actor, value = agent.wm, agent.actor, agent.value
rp = ReplayBuffer(args.buffer_size, 1, (3, 64, 64), 2, seed=7, path='/tmp/cvrl_inv/run/replay', resume=True)
rp.load_state_dict(ck['replay']); rp.rng = np.random.default_rng(7)
with torch.no_grad():
    b = {k: torch.as_tensor(np.ascontiguousarray(v)) for k, v in rp.sample(16, 32).items()}
    deter, stoch, _, _ = wm.rssm.observe(wm.encoder(b['obs']), b['action'], b['is_first'])
    d, s = deter.flatten(0, 1), stoch.flatten(0, 1)
    for name, act in (('actor sample', lambda f, t: actor(f)[0]), ('actor mode', lambda f, t: actor.mode(f)),
                      ('uniform random', lambda f, t: torch.rand(f.shape[0], 2) * 2 - 1)):
        feat, _ = cvrl.imagine(wm.rssm, act, d, s, 300)
        r, v = wm.reward(feat)[..., 0], value(feat)[..., 0]
        disc = args.gamma ** torch.arange(301.0)[:, None]
        mc = (disc[:-1] * r[:-1]).sum(0) + disc[-1] * v[-1]
        print(f'{name:15s}: v(s_0) mean {v[0].mean():.3f}; model-consistent 300-step return {mc.mean():.3f} '
              f'(reward part {(disc[:-1] * r[:-1]).sum(0).mean():.3f}); mean r per step by 50-step block '
              + ' '.join(f'{x:.4f}' for x in r[:300].reshape(6, 50, -1).mean((1, 2)).tolist())
              + f'; v by block ' + ' '.join(f'{x:.2f}' for x in v[:300].reshape(6, 50, -1).mean((1, 2)).tolist()))
