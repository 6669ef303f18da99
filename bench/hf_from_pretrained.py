#!/usr/bin/env python3
"""Check a checkpoint folder written by evl-ecg against Hugging Face transformers.

Given
  FOLDER  a checkpoint folder in the layout of /work/shared/hf/<case> (config.json,
          model.safetensors, tokenizer and processor files), as evl-ecg exports it, and
  INPUTS  a safetensors file holding
            input_ids                        [seq] or [1, seq], any integer dtype
            pixel_values                     as the processor returns them (Qwen3-VL
                                             [n_patches, C*T*P*P]; LLaVA-NeXT [1, tiles, 3, H, W])
            image_grid_thw [1, 3] (Qwen3-VL) or image_sizes [1, 2] (LLaVA-NeXT)
            logits                           [k, vocab] or [1, k, vocab]: evl-ecg's logits for the
                                             LAST k positions (k = seq for all of them)
          and optionally attention_mask and mm_token_type_ids (Qwen3-VL; derived from input_ids
          when absent: image_token_id -> 1, video_token_id -> 2, else 0),
the script loads FOLDER with transformers in float32 (bf16 weights widened) with eager
attention, runs the inputs, and prints the largest |logits difference| over the last k positions
together with how many argmax tokens differ.

Exit status: 0 if max |diff| <= --atol (default 1e-3), 1 if above, 2 if transformers cannot load
the folder (an original-LLaVA `LlavaLlamaForCausalLM` folder, as PULSE-7B is published, uses
tensor names and a config that transformers has no class for), 3 for a malformed INPUTS file.

Usage (in the venv of bench/requirements-hf.txt):
  /work/hfenv/bin/python bench/hf_from_pretrained.py FOLDER INPUTS [--atol 1e-3] [--threads 1]
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file

# Architectures of the original LLaVA repository (haotian-liu/LLaVA); transformers cannot load them.
ORIGINAL_LLAVA = {"LlavaLlamaForCausalLM", "LlavaMistralForCausalLM", "LlavaMptForCausalLM"}


def fail(code, message):
    print(message, file=sys.stderr)
    sys.exit(code)


def load_model(folder):
    """Pick the class from config.json's `architectures`, as from_pretrained users do."""
    import transformers

    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    archs = config.get("architectures") or []
    if set(archs) & ORIGINAL_LLAVA or (config.get("model_type") == "llava" and "mm_vision_tower" in config):
        fail(
            2,
            f"{folder}: architecture {archs} is the original LLaVA repository's naming "
            "(model.layers.*, model.mm_projector.*, model.vision_tower.vision_tower.*, mm_* config keys); "
            "transformers cannot load it. Export the transformers form (LlavaNextForConditionalGeneration) "
            "to compare.",
        )
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModelForImageTextToText
    try:
        model = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    except Exception as err:  # a config or weights file that transformers refuses
        fail(2, f"{folder}: transformers cannot load it with {cls.__name__}: {type(err).__name__}: {err}")
    return model.eval()


def as_batch(t, dims):
    """Add the batch dimension when the file stores a tensor without it."""
    return t.unsqueeze(0) if t.dim() == dims - 1 else t


def build_inputs(model, data):
    """The keyword arguments of the model's forward, from the tensors evl-ecg wrote."""
    for key in ("input_ids", "pixel_values", "logits"):
        if key not in data:
            fail(3, f"inputs file lacks `{key}` (has {sorted(data)})")
    ids = as_batch(data["input_ids"].to(torch.int64), 2)
    kwargs = {
        "input_ids": ids,
        "attention_mask": as_batch(data["attention_mask"].to(torch.int64), 2)
        if "attention_mask" in data
        else torch.ones_like(ids),
        "pixel_values": data["pixel_values"].to(torch.float32),
    }
    if "image_grid_thw" in data:  # Qwen2-VL family: multimodal RoPE needs the token types
        kwargs["image_grid_thw"] = as_batch(data["image_grid_thw"].to(torch.int64), 2)
        if "mm_token_type_ids" in data:
            kwargs["mm_token_type_ids"] = as_batch(data["mm_token_type_ids"].to(torch.int64), 2)
        else:
            types = torch.zeros_like(ids)
            types[ids == model.config.image_token_id] = 1
            video = getattr(model.config, "video_token_id", None)
            if video is not None:
                types[ids == video] = 2
            kwargs["mm_token_type_ids"] = types
    elif "image_sizes" in data:  # LLaVA-NeXT
        kwargs["image_sizes"] = as_batch(data["image_sizes"].to(torch.int64), 2)
    else:
        fail(3, "inputs file needs `image_grid_thw` (Qwen3-VL) or `image_sizes` (LLaVA-NeXT)")
    return kwargs


def main():
    ap = argparse.ArgumentParser(description="Compare evl-ecg's logits with transformers on its exported folder.")
    ap.add_argument("folder", help="checkpoint folder written by evl-ecg")
    ap.add_argument("inputs", help="safetensors with input_ids, pixel_values, image_grid_thw|image_sizes, logits")
    ap.add_argument("--atol", type=float, default=1e-3, help="largest allowed |logits diff| (default 1e-3)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.folder)
    data = load_file(args.inputs)
    kwargs = build_inputs(model, data)
    theirs = data["logits"].to(torch.float32)
    theirs = theirs[0] if theirs.dim() == 3 else theirs
    k = theirs.shape[0]
    seq = kwargs["input_ids"].shape[1]
    if k > seq:
        fail(3, f"`logits` has {k} positions but input_ids only {seq}")

    with torch.no_grad():
        ours = model(**kwargs).logits[0, -k:]
    if ours.shape != theirs.shape:
        fail(3, f"logits shape {list(theirs.shape)} does not match transformers' {list(ours.shape)} (last {k})")
    diff = (ours - theirs).abs()
    worst = diff.max().item()
    pos, tok = divmod(int(diff.argmax()), diff.shape[1])
    argmax_diff = int((ours.argmax(-1) != theirs.argmax(-1)).sum())
    print(f"model: {type(model).__name__} from {args.folder}")
    print(f"positions compared: last {k} of {seq}; vocab {ours.shape[1]}")
    print(f"max |logits diff| = {worst:.3e} (position {seq - k + pos}, token {tok}); "
          f"argmax differs at {argmax_diff}/{k} positions")
    if worst > args.atol:
        print(f"FAIL: above {args.atol:g}")
        sys.exit(1)
    print(f"OK: within {args.atol:g}")


if __name__ == "__main__":
    main()
