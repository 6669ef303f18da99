"""The same ECG VLM in PyTorch, for `evl-ecg bench infer` and `evl-ecg bench train`: loads an
evl-ecg model bundle (config.json + model.safetensors, burn's parameter names and layouts).

- infer (default): runs what `interpret` runs per record (the verification question for every
  label, batched, read at the first answer token; greedy generation of the diagnosis answer),
  and reports per-record latency, peak memory, and the outputs so the caller can check both
  sides computed the same thing.
- `--train`: optimiser steps of SFT on one fixed batch (answer-token cross-entropy, AdamW with
  burn's settings: betas 0.9/0.999, eps 1e-5, decoupled weight decay, each parameter's
  gradient clipped to its own L2 norm as burn clips), reporting ms per step, peak memory and
  the loss of every step, which the caller compares with its own.

Written for this benchmark from burn 0.22's definitions: pre-norm transformer layers whose
attention path uses `norm_2` and feed-forward path `norm_1`, exact GELU, attention masks
filled with -1e4 before the softmax, Linear weights stored `[in, out]`.
"""
import argparse
import json
import math
import resource
import struct
import sys
import time

import torch


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        assert v["dtype"] == "F32", (k, v["dtype"])
        a, b = v["data_offsets"]
        t = torch.frombuffer(bytearray(data[a:b]), dtype=torch.float32)
        out[k] = t.reshape(v["shape"]) if v["shape"] else t
    return out


class Vlm:
    def __init__(self, cfg, w):
        self.cfg, self.w = cfg, w
        kind = cfg["input"]
        self.signal = "Signal" in kind
        self.inp = kind["Signal"] if self.signal else kind["Image"]

    def lin(self, x, name, bias=True):
        y = x @ self.w[name + ".weight"]
        return y + self.w[name + ".bias"] if bias else y

    def ln(self, x, name):
        return torch.nn.functional.layer_norm(
            x, x.shape[-1:], self.w[name + ".gamma"], self.w[name + ".beta"], 1e-5
        )

    def mha(self, x, name, heads, mask):
        b, s, d = x.shape
        dk = d // heads
        q = self.lin(x, name + ".query").view(b, s, heads, dk).transpose(1, 2)
        k = self.lin(x, name + ".key").view(b, s, heads, dk).transpose(1, 2)
        v = self.lin(x, name + ".value").view(b, s, heads, dk).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(dk)
        if mask is not None:
            scores = scores.masked_fill(mask, -1.0e4)
        ctx = torch.softmax(scores, -1) @ v
        return self.lin(ctx.transpose(1, 2).reshape(b, s, d), name + ".output")

    def encoder(self, x, prefix, layers, heads, mask=None):
        for i in range(layers):
            p = f"{prefix}.layers.{i}"
            x = x + self.mha(self.ln(x, p + ".norm_2"), p + ".mha", heads, mask)
            h = self.ln(x, p + ".norm_1")
            h = self.lin(torch.nn.functional.gelu(self.lin(h, p + ".pwff.linear_inner")), p + ".pwff.linear_outer")
            x = x + h
        return x

    def image_stem(self, x):
        """burn's ImageStem: three stride-2 convolutions with group norm (8 groups) and GELU,
        then one convolution with kernel and stride patch / 8."""
        F = torch.nn.functional
        for i, pad in ((0, 1), (1, 1), (2, 1)):
            x = F.conv2d(x, self.w[f"image_stem.convs.{i}.weight"], self.w[f"image_stem.convs.{i}.bias"], stride=2, padding=pad)
            x = F.gelu(F.group_norm(x, 8, self.w[f"image_stem.norms.{i}.gamma"], self.w[f"image_stem.norms.{i}.beta"], 1e-5))
        last = self.inp["patch"] // 8
        return F.conv2d(x, self.w["image_stem.convs.3.weight"], self.w["image_stem.convs.3.bias"], stride=last)

    def encode(self, px):
        c = self.cfg
        b = px.shape[0]
        if self.signal:
            leads, samples, patch = self.inp["leads"], self.inp["samples"], self.inp["patch"]
            n = samples // patch
            x = px[:, :leads, : n * patch]
            if c.get("stem_channels", 0) > 0:
                for conv in ("stem.conv1", "stem.conv2"):
                    x = torch.nn.functional.gelu(
                        torch.nn.functional.conv1d(x, self.w[conv + ".weight"], self.w[conv + ".bias"], padding=3)
                    )
                leads = x.shape[1]
            x = x.reshape(b, leads, n, patch).transpose(1, 2).reshape(b, n, leads * patch)
        else:
            h, wd, p = self.inp["height"], self.inp["width"], self.inp["patch"]
            gh, gw = h // p, wd // p
            page = px.reshape(b, h, wd)[:, : gh * p, : gw * p]
            if c.get("stem_channels", 0) > 0:
                y = self.image_stem(page.reshape(b, 1, gh * p, gw * p))
                x = y.reshape(b, y.shape[1], gh * gw).transpose(1, 2)
            else:
                x = page.reshape(b, gh, p, gw, p).transpose(2, 3).reshape(b, gh * gw, p * p)
        x = self.lin(x, "patch_embed") + self.w["vis_pos"].unsqueeze(0)
        x = self.encoder(x, "vision", c["vision_layers"], c["vision_heads"])
        return self.ln(x, "vis_norm")

    def decode(self, visual, ids):
        c = self.cfg
        b, v, _ = visual.shape
        t = ids.shape[1]
        x = torch.cat([self.lin(visual, "projector"), self.w["tok_emb.weight"][ids]], 1)
        x = x + self.w["pos"][: v + t].unsqueeze(0)
        causal = torch.triu(torch.ones(v + t, v + t, dtype=torch.bool), 1)
        h = self.encoder(x, "decoder", c["layers"], c["heads"], causal)
        return self.ln(h, "norm")

    def decode_shared(self, visual_u, ids, rec):
        """`decode` with each record's visual prefix run once for all its rows (what evl-ecg's
        fused kernels do): causal attention means a prefix never sees the text after it, so
        its keys and values are the same in every row about that record. Returns the final
        hidden states of the text positions `[rows, t, d]`."""
        c = self.cfg
        u, v, _ = visual_u.shape
        b, t = ids.shape
        heads = c["heads"]
        xp = self.lin(visual_u, "projector") + self.w["pos"][:v].unsqueeze(0)
        xt = self.w["tok_emb.weight"][ids] + self.w["pos"][v : v + t].unsqueeze(0)
        d = xp.shape[-1]
        dk = d // heads
        mask_p = torch.triu(torch.ones(v, v, dtype=torch.bool), 1)
        # A text position sees the whole prefix and the text up to itself.
        mask_t = torch.cat([torch.zeros(t, v, dtype=torch.bool), torch.triu(torch.ones(t, t, dtype=torch.bool), 1)], 1)

        def split(x, name, n, s):
            return self.lin(x, name).view(n, s, heads, dk).transpose(1, 2)

        def attend(q, k, vv, mask, n, s):
            scores = (q @ k.transpose(-1, -2) / math.sqrt(dk)).masked_fill(mask, -1.0e4)
            return (torch.softmax(scores, -1) @ vv).transpose(1, 2).reshape(n, s, d)

        for i in range(c["layers"]):
            p = f"decoder.layers.{i}"
            hp, ht = self.ln(xp, p + ".norm_2"), self.ln(xt, p + ".norm_2")
            qp, kp, vp = (split(hp, f"{p}.mha.{n}", u, v) for n in ("query", "key", "value"))
            qt, kt, vt = (split(ht, f"{p}.mha.{n}", b, t) for n in ("query", "key", "value"))
            ctx_p = attend(qp, kp, vp, mask_p, u, v)
            ctx_t = attend(qt, torch.cat([kp[rec], kt], 2), torch.cat([vp[rec], vt], 2), mask_t, b, t)
            xp = xp + self.lin(ctx_p, p + ".mha.output")
            xt = xt + self.lin(ctx_t, p + ".mha.output")
            for name in ("xp", "xt"):
                x = xp if name == "xp" else xt
                h = self.lin(torch.nn.functional.gelu(self.lin(self.ln(x, p + ".norm_1"), p + ".pwff.linear_inner")), p + ".pwff.linear_outer")
                if name == "xp":
                    xp = x + h
                else:
                    xt = x + h
        return self.ln(xt, "norm")

    def head(self, h):
        return h @ self.w["lm_head.weight"]


VISION = ("stem.", "image_stem.", "patch_embed.", "vis_pos", "vision.", "vis_norm.")


def train(job):
    """Optimiser steps on one fixed batch; returns ms per timed step and every step's loss."""
    cfg = json.load(open(job["model"] + "/config.json"))
    w = load_safetensors(job["model"] + "/model.safetensors")
    frozen = job["freeze_vision"]
    params = []
    for k, v in w.items():
        if not (frozen and k.startswith(VISION)):
            v.requires_grad_(True)
            params.append(v)
    m = Vlm(cfg, w)
    px = torch.frombuffer(bytearray(open(job["pixels"], "rb").read()), dtype=torch.float32).reshape(job["pixels_shape"])
    ids = torch.tensor(job["ids"], dtype=torch.long)
    answer = torch.tensor(job["answer"], dtype=torch.bool)
    opt = torch.optim.AdamW(params, lr=job["lr"], betas=(0.9, 0.999), eps=1e-5, weight_decay=job["weight_decay"])
    clip = job["clip_norm"]
    losses, times = [], []
    cached = None
    if job.get("cache_visual"):
        # The frozen encoder's tokens computed once, before the steps (as evl-ecg's sft does).
        with torch.no_grad():
            cached = m.encode(px)
    shared = job.get("shared_prefix", False)
    if shared:
        # One prefix per record (the visual tokens of its first row); text after the last
        # answer token is never read by the loss, so the batch is cut there.
        assert not bool(answer[:, 0].any())
        rec = torch.tensor(job["records"], dtype=torch.long)
        first = [job["records"].index(r) for r in range(int(rec.max()) + 1)]
        if cached is not None:
            visual_u = cached[first]
        px_u = px[first]
        last = int(max(int(torch.nonzero(a).max()) for a in answer)) + 1
        ids_s, answer_s = ids[:, :last], answer[:, :last]
    for step in range(job["warmup"] + job["steps"]):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if shared:
            if cached is None:
                # The encoder runs once per record (it learns unless frozen).
                if frozen:
                    with torch.no_grad():
                        visual_u = m.encode(px_u)
                else:
                    visual_u = m.encode(px_u)
            h = m.decode_shared(visual_u, ids_s, rec)
            # Text position i - 1 predicts token i (no answer at token 0).
            logits = m.head(h[:, :-1])
            nll = -torch.log_softmax(logits, -1).gather(2, ids_s[:, 1:].unsqueeze(2)).squeeze(2)
            ans = answer_s[:, 1:]
            loss = (nll * ans).sum() / ans.sum()
        else:
            if cached is not None:
                visual = cached
            elif frozen:
                with torch.no_grad():
                    visual = m.encode(px)
            else:
                visual = m.encode(px)
            b, v, _ = visual.shape
            t = ids.shape[1]
            h = m.decode(visual, ids)
            # Position v - 1 + i predicts text token i.
            logits = m.head(h[:, v - 1 : v + t - 1])
            nll = -torch.log_softmax(logits, -1).gather(2, ids.unsqueeze(2)).squeeze(2)
            loss = (nll * answer).sum() / answer.sum()
        loss.backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    n = p.grad.norm()
                    p.grad.mul_(torch.clamp(clip / (n + 1.1754944e-38), max=1.0))
        opt.step()
        losses.append(float(loss))
        if step >= job["warmup"]:
            times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "median_ms": 1e3 * times[len(times) // 2],
        "params": sum(p.numel() for p in w.values()),
        "trainable": sum(p.numel() for p in params),
        "losses": losses,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", required=True, help="JSON written by evl-ecg bench infer or bench train")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train", action="store_true", help="optimiser steps instead of inference")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    job = json.load(open(args.job))
    if args.train:
        out = train(job)
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        out["torch"] = torch.__version__
        json.dump(out, sys.stdout)
        return
    cfg = json.load(open(job["model"] + "/config.json"))
    w = load_safetensors(job["model"] + "/model.safetensors")
    m = Vlm(cfg, w)
    shape = job["pixels_shape"]
    px_all = torch.frombuffer(bytearray(open(job["pixels"], "rb").read()), dtype=torch.float32).reshape(shape)
    prompts, yes, no, eos = job["verify_prompts"], job["yes"], job["no"], job["eos"]
    diag = job["diagnosis_prompt"]
    outs, times = [], []
    with torch.inference_mode():
        for rep in range(job["reps"] + 1):
            for r in range(shape[0]):
                t0 = time.perf_counter()
                px = px_all[r : r + 1]
                visual = m.encode(px)
                # Verification rows: prompt + a placeholder, read at the first answer position.
                L = max(len(p) for p in prompts) + 1
                ids = torch.zeros(len(prompts), L, dtype=torch.long)
                for i, p in enumerate(prompts):
                    ids[i, : len(p)] = torch.tensor(p)
                    ids[i, len(p)] = eos
                # Right padding is harmless under the causal mask for the positions we read.
                h = m.decode(visual.expand(len(prompts), -1, -1), ids)
                v = visual.shape[1]
                probs = []
                for i, p in enumerate(prompts):
                    z = m.head(h[i, v + len(p) - 1])
                    probs.append(float(torch.sigmoid(z[yes] - z[no])))
                gen = list(diag)
                out_ids = []
                for _ in range(16):
                    z = m.head(m.decode(visual, torch.tensor([gen]))[0, -1])
                    nxt = int(torch.argmax(z))
                    if nxt == eos or len(gen) + 1 >= w["pos"].shape[0] - v:
                        break
                    out_ids.append(nxt)
                    gen.append(nxt)
                dt = time.perf_counter() - t0
                if rep > 0:
                    times.append(dt)
                if rep == 0:
                    outs.append({"probs": probs, "ids": out_ids})
    times.sort()
    json.dump(
        {
            "median_ms": 1e3 * times[len(times) // 2],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
            "torch": torch.__version__,
            "outputs": outs,
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
