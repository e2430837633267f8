"""BatchNorm train-mode vs eval-mode posteriors, with controls (sampling noise, batch companions, which BN).

Run (from the repository root; it was bn_check.py in /tmp/blast_inv when it ran):
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE nice -n 5 python docs/blast_diagnosis_r4/independent_bn_check.py
Batches: random sets of 16 non-overlapping 32-step windows (as replay.sample draws), target encoder (what acting
and imagination starts use). Every BatchNorm has momentum 0 here, so no running statistic changes.
"""
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
blast.restore_checkpoint(ck, nets, opts)
wm, actor = nets["wm"], nets["actor"]
for m in wm.modules():
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        m.momentum = 0.0
replay = ReplayBuffer(args.buffer_size, 1, (3, 64, 64), 2, seed=args.seed, path=f"{RUN}/replay", resume=True)
replay.load_state_dict(ck["replay"])
T, B = args.batch_length, args.batch_size
W = replay.count // T
win = np.arange(W * T).reshape(W, T)
enc_bn = [m for m in wm.target_encoder.modules() if isinstance(m, nn.BatchNorm2d)]
post_bn = wm.rssm.obs_out[1]


def batch(idx):
    rows = win[idx]
    return {"obs": torch.as_tensor(replay.obs[0, rows]), "action": torch.as_tensor(replay.action[0, rows]),
            "is_first": torch.as_tensor(replay.is_first[0, rows])}


@torch.no_grad()
def run(data, enc_train, post_train, seed):
    for m in enc_bn:
        m.train(enc_train)
    post_bn.train(post_train)
    torch.manual_seed(seed)
    emb = wm.target_encoder(data["obs"])
    d, s, p = wm.rssm.observe(emb, data["action"], data["is_first"])
    wm.train(True)
    return emb, d, s, p


def compare(a, b):
    lpa, lpb = torch.log_softmax(a[3], -1), torch.log_softmax(b[3], -1)
    kl = (lpa.exp() * (lpa - lpb)).sum((-2, -1))  # (B, T)
    agree = (a[3].argmax(-1) == b[3].argmax(-1)).float().mean()
    fa, fb = blast.feature(a[1], a[2]), blast.feature(b[1], b[2])
    da, db = actor(fa), actor(fb)
    return [kl.mean().item(), kl[:, :4].mean().item(), kl[:, -8:].mean().item(), agree.item(),
            ((a[1] - b[1]).norm() / b[1].norm()).item(), (da.mode - db.mode).abs().mean().item(),
            (da.mode.sign() != db.mode.sign()).float().mean().item()]


@torch.no_grad()
def one_step(data, seed, data2):
    """Per-step mismatch without compounding: the train-mode deter history, then q from train-mode vs eval-mode BN.
    Control: train mode with the last 8 of the 16 windows replaced (data2 holds the same first 8), first 8 compared."""
    tr = run(data, True, True, seed)
    tr2 = run(data2, True, True, seed)
    for m in enc_bn:
        m.train(True)
    post_bn.train(True)
    e1, e2 = wm.target_encoder(data["obs"]), wm.target_encoder(data2["obs"])
    d12 = torch.cat([tr[1][:8], tr2[1][8:]])
    # the first 8 windows' embeddings: from their own batch's encoder pass (the encoder BN's companions differ too)
    e12 = torch.cat([e2[:8], e2[8:]])
    comp = torch.stack([wm.rssm.post_logits(d12[:, t], e12[:, t]) for t in range(T)], 1)[:8]
    base = torch.stack([wm.rssm.post_logits(tr[1][:, t], e1[:, t]) for t in range(T)], 1)[:8]
    wm.train(True)
    lpb, lpc = torch.log_softmax(base, -1), torch.log_softmax(comp, -1)
    companions = ((lpb.exp() * (lpb - lpc)).sum((-2, -1)).mean().item(), (base.argmax(-1) == comp.argmax(-1)).float().mean().item())
    logits = {}
    for name, et, pt in (("train", True, True), ("eval", False, False), ("enc eval only", False, True),
                         ("post eval only", True, False)):
        for m in enc_bn:
            m.train(et)
        emb = wm.target_encoder(data["obs"])
        post_bn.train(pt)
        x = torch.cat([tr[1], emb], -1)  # (B, T, D+E): obs_out BN in train mode uses all B*T rows here
        if pt:  # train mode as in observe: statistics over the B states of each step
            logits[name] = torch.stack([wm.rssm.post_logits(tr[1][:, t], emb[:, t]) for t in range(T)], 1)
        else:
            logits[name] = wm.rssm.post_logits(tr[1].flatten(0, 1), emb.flatten(0, 1)).unflatten(0, (B, T))
        wm.train(True)
    out = {}
    lp0 = torch.log_softmax(logits["train"], -1)
    for k in ("eval", "enc eval only", "post eval only"):
        lp = torch.log_softmax(logits[k], -1)
        out[k] = ((lp0.exp() * (lp0 - lp)).sum((-2, -1)).mean().item(),
                  (logits["train"].argmax(-1) == logits[k].argmax(-1)).float().mean().item())
    out["train, other companions"] = companions
    return out


rng = np.random.default_rng(0)
rows = {k: [] for k in ("train vs eval (acting)", "train vs train, other Gumbel draws",
                        "eval vs eval, other Gumbel draws", "train vs train, other batch companions",
                        "train vs enc-eval/post-train", "train vs enc-train/post-eval")}
steps = {k: [] for k in ("eval", "enc eval only", "post eval only", "train, other companions")}
for rep in range(12):
    idx = rng.choice(W, B, replace=False)
    data = batch(idx)
    tr, ev = run(data, True, True, rep), run(data, False, False, rep)
    rows["train vs eval (acting)"].append(compare(tr, ev))
    rows["train vs train, other Gumbel draws"].append(compare(tr, run(data, True, True, 1000 + rep)))
    rows["eval vs eval, other Gumbel draws"].append(compare(ev, run(data, False, False, 1000 + rep)))
    # the same first 8 windows, the other 8 companions replaced
    idx2 = np.concatenate([idx[:8], rng.choice(np.setdiff1d(np.arange(W), idx), 8, replace=False)])
    data2 = batch(idx2)
    tr2 = run(data2, True, True, rep)
    first8 = lambda x: tuple(v[:8] for v in x)  # noqa: E731
    rows["train vs train, other batch companions"].append(compare(first8(tr), first8(tr2)))
    rows["train vs enc-eval/post-train"].append(compare(tr, run(data, False, True, rep)))
    rows["train vs enc-train/post-eval"].append(compare(tr, run(data, True, False, rep)))
    for k, v in one_step(data, rep, data2).items():
        steps[k].append(v)
hdr = ["KL nats", "KL t<4", "KL t>=24", "argmax agree", "deter rel diff", "|d action mode|", "sign flips"]
print(f"{'comparison':42s} " + " ".join(f"{h:>14s}" for h in hdr))
for k, v in rows.items():
    v = np.array(v).mean(0)
    print(f"{k:42s} " + " ".join(f"{x:14.3f}" for x in v))
print("\none step, shared train-mode deter history: [KL(q_train || q_x) nats, argmax agreement]")
for k, v in steps.items():
    v = np.array(v).mean(0)
    print(f"  {k:24s} KL {v[0]:.3f}  agree {v[1]:.3f}")
# deterministic version: posterior mode instead of samples is not available in observe; report logit scale instead
data = batch(rng.choice(W, B, replace=False))
tr = run(data, True, True, 0)
p = torch.softmax(tr[3], -1)
print(f"\nposterior sharpness (train mode): mean max prob {p.max(-1).values.mean():.3f}, per-latent entropy "
      f"{-(p * p.clamp_min(1e-12).log()).sum(-1).mean():.3f} nats (uniform {np.log(args.classes):.3f})")
