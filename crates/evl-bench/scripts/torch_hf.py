"""The PyTorch reference for `evl-ecg bench hf`: loads a Hugging Face checkpoint folder (Qwen3-VL
or LLaVA-NeXT, transformers' layout) with transformers in float32 and eager attention, and times
on the CPU what the Rust side times on the same inputs:
  forward_ms        model(**inputs) under torch.no_grad()
  train_step_ms     forward + next-token CE over the answer positions + backward + AdamW step
                    (lr 1e-5, weight_decay 0.01, all parameters) + zero_grad
  gen_tokens_per_s  greedy generation of exactly gen_tokens new tokens with the KV cache
each the median over the reps after one warm-up (generation: max(1, reps // 2) reps), in that
order. The first forward's logits are compared with the Rust side's (`logits_max_abs_diff`); the
first (warm-up) training step's loss is `loss`. Training updates the weights in place, so the
generation runs on the trained weights (the timing does not depend on them). Then, unless the
job says "sdpa": false, forward and training step again with attention_implementation "sdpa"
(`forward_ms_sdpa`, `train_step_ms_sdpa`: PyTorch's fused attention, much faster on long
sequences; eager is the computation the Rust side matches).

Usage: python torch_hf.py --job JOB.json --threads N
JOB.json: {"model": FOLDER, "inputs": SAFETENSORS, "reps": R, "gen_tokens": G}; the inputs file
holds float32 input_ids [1,s], attention_mask [1,s], pixel_values, image_grid_thw [1,3]
(Qwen3-VL) or image_sizes [1,2] (LLaVA-NeXT), labels_mask [1,s] and logits [1,s,vocab].
Prints one JSON object on stdout; progress goes to stderr.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def fail(message):
    print(f"torch_hf.py: {message}", file=sys.stderr)
    sys.exit(2)


def log(message):
    print(f"torch_hf.py: {message}", file=sys.stderr, flush=True)


def peak_rss_mib():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, so a process started by a
    # larger parent (evl-ecg, after its own measurement) would report the parent's peak.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mib()


def timed_median(reps, fn):
    """One warm-up call (its result is returned), then the median seconds over `reps` calls."""
    first = fn()
    times = []
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first


def build_inputs(model, data):
    """The forward's keyword arguments (as bench/hf_from_pretrained.py builds them)."""
    ids = data["input_ids"].to(torch.int64)
    kwargs = {
        "input_ids": ids,
        "attention_mask": data["attention_mask"].to(torch.int64),
        "pixel_values": data["pixel_values"].to(torch.float32),
    }
    if "image_grid_thw" in data:  # Qwen3-VL: multimodal RoPE needs the token types
        kwargs["image_grid_thw"] = data["image_grid_thw"].to(torch.int64)
        types = torch.zeros_like(ids)
        types[ids == model.config.image_token_id] = 1
        video = getattr(model.config, "video_token_id", None)
        if video is not None:
            types[ids == video] = 2
        kwargs["mm_token_type_ids"] = types
    elif "image_sizes" in data:  # LLaVA-NeXT
        kwargs["image_sizes"] = data["image_sizes"].to(torch.int64)
    else:
        fail("inputs file needs `image_grid_thw` (Qwen3-VL) or `image_sizes` (LLaVA-NeXT)")
    return kwargs


def forward_and_train(model, kwargs, mask, reps):
    """1. forward under no_grad (returns the warm-up's logits); 2. training step: next-token CE
    over the answer positions, backward, AdamW step, zero_grad (returns the warm-up's loss)."""

    def forward():
        with torch.no_grad():
            return model(**kwargs).logits

    fwd_s, logits = timed_median(reps, forward)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    targets = kwargs["input_ids"][:, 1:][mask]

    def train_step():
        out = model(**kwargs).logits
        loss = F.cross_entropy(out[:, :-1][mask], targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    model.train()
    train_s, loss = timed_median(reps, train_step)
    model.eval()
    return fwd_s, logits, train_s, loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", required=True, help="JSON written by evl-ecg bench hf")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if not os.path.isfile(args.job):
        fail(f"job file {args.job} not found")
    job = json.load(open(args.job))
    for key in ("model", "inputs", "reps", "gen_tokens"):
        if key not in job:
            fail(f"job file {args.job} lacks `{key}` (has {sorted(job)})")
    folder, reps, gen = job["model"], int(job["reps"]), int(job["gen_tokens"])
    for f in (os.path.join(folder, "config.json"), os.path.join(folder, "model.safetensors"), job["inputs"]):
        if not os.path.isfile(f):
            fail(f"{f} not found")

    import transformers
    from safetensors.torch import load_file

    data = load_file(job["inputs"])
    for key in ("input_ids", "attention_mask", "pixel_values", "labels_mask", "logits"):
        if key not in data:
            fail(f"inputs file {job['inputs']} lacks `{key}` (has {sorted(data)})")

    archs = json.load(open(os.path.join(folder, "config.json"))).get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    cls = cls or transformers.AutoModelForImageTextToText
    log(f"loading {folder} with {cls.__name__}")
    model = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    rss_after_load = current_rss_mib()
    params = sum(p.numel() for p in model.parameters())
    kwargs = build_inputs(model, data)
    ids = kwargs["input_ids"]
    theirs = data["logits"].to(torch.float32)
    mask = data["labels_mask"][:, 1:] > 0.5
    if not bool(mask.any()):
        fail("labels_mask has no answer position")

    log(f"forward + train step: seq {ids.shape[1]}, {params} parameters, {reps} reps (eager)")
    fwd_s, logits, train_s, loss = forward_and_train(model, kwargs, mask, reps)
    if logits.shape != theirs.shape:
        fail(f"`logits` shape {list(theirs.shape)} differs from transformers' {list(logits.shape)}")
    diff = (logits - theirs).abs().max().item()
    del logits

    # 3. Greedy generation of exactly `gen` new tokens with the KV cache.
    gen_reps = max(1, reps // 2)
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.generation_config, "eos_token_id", None)
        pad = pad[0] if isinstance(pad, list) else pad

    def generate():
        with torch.no_grad():
            out = model.generate(**kwargs, max_new_tokens=gen, min_new_tokens=gen, do_sample=False,
                                 use_cache=True, pad_token_id=pad)
        assert out.shape[1] - ids.shape[1] == gen, (out.shape, ids.shape)
        return out

    log(f"generation: {gen} tokens, {gen_reps} reps")
    gen_s, _ = timed_median(gen_reps, generate)

    # The same forward and training step with PyTorch's fused attention (sdpa), for scale.
    extra = {}
    if job.get("sdpa", True):
        log("forward + train step (sdpa)")
        model.set_attn_implementation("sdpa")
        fwd_sdpa, _, train_sdpa, _ = forward_and_train(model, kwargs, mask, reps)
        extra = {"forward_ms_sdpa": 1e3 * fwd_sdpa, "train_step_ms_sdpa": 1e3 * train_sdpa}

    json.dump(
        {
            "forward_ms": 1e3 * fwd_s,
            "train_step_ms": 1e3 * train_s,
            "gen_tokens_per_s": gen / gen_s,
            **extra,
            "loss": loss,
            "logits_max_abs_diff": diff,
            "params": params,
            "seq_len": ids.shape[1],
            "answer_tokens": int(mask.sum()),
            "rss_after_load_mib": rss_after_load,
            "peak_rss_mib": peak_rss_mib(),
            "threads": args.threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
