"""BLAST finger-spin seed 1 (commit ae4841d): the final checkpoint's actor on replay states, in acting (eval) and
training mode; replay reward statistics. Run: OMP_NUM_THREADS=1 nice -n 5 ~/venv/bin/python /tmp/bprobe/probe.py"""
import sys
sys.path.insert(0, "/root/lr/code")
import numpy as np, torch
import blast as b
from common.replay import ReplayBuffer

torch.set_num_threads(1); torch.manual_seed(0)
ck = torch.load("/tmp/bprobe/run/checkpoint.pt", map_location="cpu", weights_only=True)
args = b.Args(**{k: v for k, v in ck["args"].items() if k in b.Args.__dataclass_fields__})
nets, opts = b.build_agent(args, (3, 64, 64), 2, False, torch.device("cpu"))
for k, m in nets.items():
    m.load_state_dict(ck["nets"][k])
wm, actor = nets["wm"], nets["actor"]
rp = ReplayBuffer(args.buffer_size, 1, (3, 64, 64), 2, seed=0, path="/tmp/bprobe/run/replay", resume=True)
rp.load_state_dict(ck["replay"])
n = rp.count
r = rp.reward[0, :n]
print(f"frames {ck['loop']['global_step']}, replay rows {n}; rewarded steps {(r > 0).sum()} ({(r > 0).mean():.3%}), "
      f"in the first 1024 rows {(r[:1024] > 0).sum()}, after {(r[1024:] > 0).sum()}; reward sum {r.sum():.1f}")
act = rp.action[0, :n]
print("replayed actions after prefill: |a| > 0.95 fraction", (np.abs(act[1024:]) > 0.95).mean().round(3),
      "mean", act[1024:].mean(0).round(3), "std", act[1024:].std(0).round(3))
T, starts = 32, np.linspace(1024, n - 33, 48).astype(int)
idx = starts[:, None] + np.arange(T)
obs = torch.as_tensor(rp.obs[0, idx]); action = torch.as_tensor(rp.action[0, idx])
first = torch.zeros(len(starts), T, dtype=torch.bool); first[:, 0] = True
with torch.no_grad():
    for mode, training in (("train mode (batch statistics)", True), ("eval mode (running statistics)", False)):
        b.set_mode(training, wm, actor)
        for name, enc in (("online encoder", wm.encoder), ("acting encoder", wm.act_encoder)):
            embed = enc(obs)
            deter, stoch, _ = wm.rssm.observe(embed, action, first)
            dist = actor(b.feature(deter, stoch))
            m = dist.mode
            print(f"{mode:32s} {name:15s} embed std {embed.std():.3f}; actor mode |a|>0.95 {(m.abs() > 0.95).float().mean():.3f}, "
                  f"mode mean {m.mean((0, 1)).numpy().round(3)}, std mean {dist.std.mean():.3f} (< 0.12: "
                  f"{(dist.std < 0.12).float().mean():.3f}), entropy {dist.entropy().mean():.3f}")
    b.set_mode(True, wm, actor)
