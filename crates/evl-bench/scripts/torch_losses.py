"""Reference timings for `evl-ecg bench losses`: the same losses written the straightforward
way in PyTorch (float32, CPU), and POT's `ot.bregman.sinkhorn_log` for the Sinkhorn plan.

Called by the Rust command with the shapes as JSON; prints {case: median milliseconds}.
With --device cuda every tensor is made on the GPU and each timing ends with
torch.cuda.synchronize(); POT (CPU, NumPy) is then still timed on the CPU, and skipped when it
is not installed.
Each case is forward + backward, as in the Rust side; the Sinkhorn plan is forward only
(100 log-domain iterations per example, stopThr=0 so POT runs them all)."""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


SYNC = lambda: None  # noqa: E731  (replaced by torch.cuda.synchronize on a GPU)


def median_ms(reps, fn):
    fn()
    SYNC()
    times = []
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        fn()
        SYNC()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sinkhorn_log_plan(C, eps, n_iter):
    # Log-domain Sinkhorn (POT order: column then row), batched, no autograd.
    B, n, m = C.shape
    logk = -C / eps
    log_a = torch.full((B, n, 1), -torch.log(torch.tensor(float(n))).item())
    log_b = torch.full((B, 1, m), -torch.log(torch.tensor(float(m))).item())
    u = torch.zeros(B, n, 1)
    v = torch.zeros(B, 1, m)
    for _ in range(n_iter):
        v = log_b - torch.logsumexp(logk + u, dim=1, keepdim=True)
        u = log_a - torch.logsumexp(logk + v, dim=2, keepdim=True)
    return torch.exp(logk + u + v)


def ot_loss(t, s, eps, n_iter):
    tn, sn = F.normalize(t, dim=-1), F.normalize(s, dim=-1)
    C = torch.cdist(tn, sn) ** 2
    with torch.no_grad():
        P = sinkhorn_log_plan(C, eps, n_iter)
    return (P * C).sum(dim=(1, 2)).mean()


def mhca(hs, ht, wq, wk, wv, wo, h):
    B, Ls, _ = hs.shape
    Lt = ht.shape[1]
    dk = wq.shape[1] // h
    q = (hs @ wq).view(B, Ls, h, dk).transpose(1, 2)
    k = (ht @ wk).view(B, Lt, h, dk).transpose(1, 2)
    v = (ht @ wv).view(B, Lt, h, dk).transpose(1, 2)
    a = torch.softmax(q @ k.transpose(2, 3) / dk**0.5, dim=-1)
    return (a @ v).transpose(1, 2).reshape(B, Ls, h * dk) @ wo


def relation(x, y):
    def psi_d(z):
        d = torch.cdist(z, z)
        L = z.shape[1]
        mu = d.sum(dim=(1, 2), keepdim=True) / (L * (L - 1))
        return d / mu

    def psi_a(z):
        zn = F.normalize(z, dim=-1)
        return zn @ zn.transpose(1, 2)

    n = x.shape[0] * x.shape[1] ** 2
    ld = ((psi_d(x) - psi_d(y)) ** 2).sum() / n
    la = ((psi_a(x) - psi_a(y)) ** 2).sum() / n
    return 0.5 * (ld + la)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    s = json.loads(args.shapes)
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        global SYNC
        SYNC = torch.cuda.synchronize
        torch.set_default_device("cuda")
    torch.manual_seed(0)
    B, vt, vs, lt, ls, dt, ds, h = (s[k] for k in ["b", "v_t", "v_s", "l_t", "l_s", "d_t", "d_s", "heads"])
    eps, n_iter = s["eps"], s["n_iter"]
    dk = ds // h

    def r(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).requires_grad_()

    out = {}

    import numpy as np

    try:
        import ot as pot
    except ImportError:
        pot = None
        if args.device == "cpu":
            raise
    if pot is not None:
        C = np.minimum(np.abs(np.random.default_rng(7).standard_normal((B, vt, vs))), 4.0)
        a, b = np.full(vt, 1.0 / vt), np.full(vs, 1.0 / vs)
        out["sinkhorn_plan"] = median_ms(
            args.reps, lambda: [pot.bregman.sinkhorn_log(a, b, C[i], eps, numItermax=n_iter, stopThr=0.0) for i in range(B)]
        )

    t, sv = r(B, vt, ds), r(B, vs, ds)

    def run_ot():
        ot_loss(t, sv, eps, n_iter).backward()

    out["ot_loss"] = median_ms(args.reps, run_ot)

    def weights():
        return (r(ds, h * dk, scale=ds**-0.5), r(dt, h * dk, scale=dt**-0.5), r(dt, h * dk, scale=dt**-0.5), r(h * dk, ds, scale=(h * dk) ** -0.5))

    hs = r(B, ls, ds)
    ht = torch.randn(B, lt, dt)  # the teacher's hidden states: frozen, no gradient
    w = weights()

    def run_mhca():
        hhat = mhca(hs, ht, *w, h)
        (((hs - hhat) ** 2).sum(-1).mean()).backward()

    out["mhca"] = median_ms(args.reps, run_mhca)

    x, y = r(B, ls, ds), r(B, ls, ds)

    def run_rel():
        relation(x, y).backward()

    out["relation"] = median_ms(args.reps, run_rel)

    ce = torch.tensor(2.0, requires_grad=True)

    def run_total():
        hhat = mhca(hs, ht, *w, h)
        l_mhca = ((hs - hhat) ** 2).sum(-1).mean()
        total = 0.7 * ce + 0.3 * (1.0 * l_mhca + 0.03 * relation(hhat, hs) + 0.1 * ot_loss(t, sv, eps, n_iter))
        total.backward()

    out["evl_total"] = median_ms(args.reps, run_total)

    n = B * ls

    zs_kd, zt_kd = r(n, s["vocab_s"]), r(n, s["vocab_s"])

    def run_kd():
        zs, zt = zs_kd, zt_kd
        T = 2.0
        (F.kl_div(F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1), reduction="batchmean", log_target=True) * T * T).backward()

    out["kd_vanilla"] = median_ms(args.reps, run_kd)

    zs_u, zt_u = r(n, s["vocab_s"]), r(n, s["vocab_t"])

    def run_uld():
        zs, zt = zs_u, zt_u
        ps = torch.softmax(zs, -1).sort(-1, descending=True).values
        pt = torch.softmax(zt, -1).sort(-1, descending=True).values
        w = max(ps.shape[1], pt.shape[1])
        ps, pt = F.pad(ps, (0, w - ps.shape[1])), F.pad(pt, (0, w - pt.shape[1]))
        (ps - pt).abs().sum(-1).mean().backward()

    out["uld"] = median_ms(args.reps, run_uld)
    # Baselines (method.md 3); the teacher's states and logits are frozen inputs.
    vs_, vt_ = s["vocab_s"], s["vocab_t"]
    hs_b, ht_b, wh = r(B, ls, ds), torch.randn(B, lt, dt), r(ds, dt, scale=ds**-0.5)
    idx = torch.tensor([min((i * lt) // ls, lt - 1) for i in range(ls)])

    def run_tinybert():
        proj = hs_b @ wh
        ((proj - ht_b[:, idx]) ** 2).sum(-1).div(dt).mean().backward()

    out["tinybert_hidden"] = median_ms(args.reps, run_tinybert)

    rl = min(s["rkd_len"], ls)
    t_r, s_r = torch.randn(B, rl, dt), r(B, rl, ds)

    def rkd_psi_d(x):
        d = torch.cdist(x, x)
        L = x.shape[1]
        return d / (d.sum(dim=(1, 2), keepdim=True) / (L * (L - 1)))

    def rkd_psi_a(x):
        e = F.normalize(x[:, :, None, :] - x[:, None, :, :], dim=-1)  # [b, i, j, d]
        ej = e.transpose(1, 2)  # [b, j, i, d]
        return ej @ ej.transpose(2, 3)

    def run_rkd():
        ld = F.smooth_l1_loss(rkd_psi_d(s_r), rkd_psi_d(t_r))
        la = F.smooth_l1_loss(rkd_psi_a(s_r), rkd_psi_a(t_r))
        (ld + 2.0 * la).backward()

    out["rkd"] = median_ms(args.reps, run_rkd)

    zs_m, zt_m = r(B, ls, vs_), torch.randn(B, lt, vt_)
    k_top = min(50, vs_, vt_)

    def run_mlot():
        ps = torch.softmax(zs_m, -1).sort(-1, descending=True).values[..., :k_top]
        pt = torch.softmax(zt_m, -1).sort(-1, descending=True).values[..., :k_top]
        L = min(ls, lt)
        n_tok = B * L
        l1 = (ps[:, :L] - pt[:, :L]).abs().sum() / n_tok
        ce = -(pt[:, :L] * ps[:, :L].clamp_min(1e-30).log()).sum() / n_tok
        cost = (pt[:, :, None, :] - ps[:, None, :, :]).abs().sum(-1)  # [b, lt, ls]
        with torch.no_grad():
            plan = sinkhorn_log_plan(cost, eps, n_iter)
        seq = (plan * cost).sum() / B
        (l1 + ce + seq).backward()

    out["multilevel_ot"] = median_ms(args.reps, run_mlot)

    da = 64
    wq_d, wk_d = r(dt, da, scale=dt**-0.5), r(ds, da, scale=ds**-0.5)
    ws2t, wt2s = r(ds, dt, scale=ds**-0.5), r(dt, ds, scale=dt**-0.5)
    hs_d, ht_d = r(B, ls, ds), torch.randn(B, lt, dt)
    zs_d, zt_d = r(B, ls, vs_), torch.randn(B, lt, vt_)
    head_s, head_t = torch.randn(ds, vs_) * ds**-0.5, torch.randn(dt, vt_) * dt**-0.5
    y_d = torch.arange(B * ls).reshape(B, ls) % vs_

    def kl_rows(logp, logq):
        return (logp.exp() * (logp - logq)).sum() / (logp.shape[0] * logp.shape[1])

    def run_dskd():
        q, k = ht_d @ wq_d, hs_d @ wk_d
        scores = q @ k.transpose(1, 2) / da**0.5  # [b, lt, ls]
        a_ts = torch.softmax(scores, -1)
        a_st = torch.softmax(scores.transpose(1, 2), -1)
        z_s2t = (a_ts @ (hs_d @ ws2t)) @ head_t
        z_t2s = (a_st @ (ht_d @ wt2s)) @ head_s
        kl_t = kl_rows(F.log_softmax(zt_d, -1), F.log_softmax(z_s2t, -1))
        # The projection learns from the ground truth and teaches only where it is right.
        flat = z_t2s.reshape(-1, vs_)
        y = y_d.reshape(-1)
        ce = F.cross_entropy(flat, y)
        right = flat.argmax(-1) == y
        if right.any():
            lp = F.log_softmax(flat[right], -1).detach()
            kl_s = (lp.exp() * (lp - F.log_softmax(zs_d.reshape(-1, vs_)[right], -1))).sum() / lp.shape[0]
        else:
            kl_s = torch.zeros(())
        (kl_t + ce + kl_s).backward()

    out["dskd"] = median_ms(args.reps, run_dskd)

    print(json.dumps(out))


if __name__ == "__main__":
    main()
