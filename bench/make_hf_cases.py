#!/usr/bin/env python3
"""Build extra Hugging Face parity cases for evl-ecg, of other sizes than the shared tiny ones.

The shared cases in /work/shared/hf (qwen3_vl_tiny, llava_next_tiny) hold tiny, randomly
initialised Qwen3-VL and LLaVA-NeXT checkpoints plus reference outputs computed by
transformers 5.25.0 in float32 eager attention. This script writes more cases in exactly the same
layout and conventions, but with every size that evl-ecg reads from config.json changed, so that
a loader or forward pass that hard-codes a tiny size (or only works for square grids, MHA, tied
embeddings, a given DeepStack layout, ...) fails loudly.

Per case the script
  1. builds the transformers config from the matching shared case's config.json, with new sizes;
  2. initialises the model from a fixed seed with our own scheme (see `init_weights`: matrices
     N(0, 0.08), embedding-like tables N(0, 0.5), biases N(0, 0.05), norm weights N(1, 0.25)),
     so that norms, biases and positions all matter (the shared models' norm weights are ~N(0, 0.08),
     which makes attention almost uniform and hides position errors);
  3. saves it in bfloat16 with `save_pretrained` (the hub's tensor names), copies the tokenizer
     files of the matching shared case and writes the processor configs (transformers 5 nested
     `processor_config.json` and the flat `preprocessor_config.json`);
  4. reloads the folder in float32 (each bf16 weight widened exactly), runs the processor on the
     same PTB-XL image and prompt as the shared case, and stores the reference tensors in
     `expected.safetensors` with the shared cases' names, shapes and dtypes, plus `case.json`.

`--check-shared` runs step 4 on the shared folders themselves and compares every tensor with
their expected.safetensors: this is how the conventions below were confirmed to be the shared ones.
`--sensitivity` re-runs each new case with deliberate implementation mistakes (non-interleaved
M-RoPE, wrong GQA head mapping, DeepStack off, wrong CLIP feature layer, ...) and prints how far
the outputs move, to show the reference is sensitive to them.

Usage (in the venv of bench/requirements-hf.txt; CPU only, about a minute per case):
  /work/hfenv/bin/python bench/make_hf_cases.py --out /work/hf-extra
  /work/hfenv/bin/python bench/make_hf_cases.py --check-shared
  /work/hfenv/bin/python bench/make_hf_cases.py --out /work/hf-extra --sensitivity
Options: --shared DIR (default /work/shared/hf), --cases NAME... (default: all), --threads N.

Conventions of expected.safetensors (batch of one; see /work/shared/hf/README.md):
  input_ids, attention_mask, (mm_token_type_ids) [1, seq] int64; pixel_values as the processor
  returns them; image_grid_thw [1, 3] | image_sizes [1, 2] int64; position_ids [3, seq] int64
  (Qwen3-VL M-RoPE index t, h, w); vision_last_hidden [n_patches, vision_hidden] (Qwen3-VL tower
  output before the merger); image_embeds [n_image_tokens, text_hidden] (exactly the rows spliced
  into the decoder input); deepstack.K [n_image_tokens, text_hidden]; hidden_states.i [seq, hidden]
  for i = 0..L as transformers' output_hidden_states (0 = input embeddings after splicing, i in
  1..L-1 = output of decoder layer i-1 BEFORE any DeepStack addition, L = after the final norm);
  logits_last [8, vocab] (last 8 positions); argmax_all [seq] int64; logsumexp_all [seq] float32;
  generated_ids [12] int64 (new tokens only; greedy, min_new_tokens = max_new_tokens = 12).
"""

import argparse
import json
import os
import shutil
import sys

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import transformers
from transformers import (
    AutoProcessor,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

# Image folder of the shared cases (case.json's "image" is a file name inside it).
IMAGE_DIR_REL = "../data/ptbxl_subset/records100/00000"

# Tolerances, as in the shared cases.
TOLERANCE = {
    "preprocess_atol": 1e-05,
    "hidden_rtol": 0.0001,
    "hidden_atol": 0.0001,
    "logits_atol": 0.001,
    "generated_ids": "exact",
}

N_LOGITS_LAST = 8  # logits_last keeps the last 8 positions
N_GENERATE = 12  # greedy tokens, min_new_tokens = max_new_tokens

# Init scheme (our own; see init_weights).
STD_MATRIX = 0.08  # Linear / Conv weights, lm_head
STD_TABLE = 0.5  # token embeddings, learned position tables, CLS embedding, image_newline
STD_BIAS = 0.05  # every bias (Linear, Conv, LayerNorm)
NORM_MEAN, NORM_STD = 1.0, 0.25  # LayerNorm / RMSNorm weights


# --------------------------------------------------------------------------------------------
# The new cases. Each edits the matching shared case's config.json and processor config.
# --------------------------------------------------------------------------------------------


def qwen3_vl_wide_spec():
    """Qwen3-VL with every size changed from qwen3_vl_tiny (64 wide, 3 layers, GQA 4:2, ...)."""

    def edit_config(c):
        t = c["text_config"]
        t.update(
            hidden_size=96,
            num_hidden_layers=4,
            num_attention_heads=6,
            num_key_value_heads=2,  # GQA 3:1
            head_dim=16,
            intermediate_size=160,
            initializer_range=STD_MATRIX,
            tie_word_embeddings=False,  # an lm_head.weight is stored
        )
        # Sections must sum to head_dim / 2 = 8. transformers interleaves them as
        # t h w t h w ... with slices (1, 3*s_h, 3) for h and (2, 3*s_w, 3) for w, so s_w <= 2 and
        # s_h <= 3 are the only values that it honours literally; [3, 3, 2] moves frequency 7
        # from t to h compared with the shared [4, 2, 2].
        t["rope_parameters"]["mrope_section"] = [3, 3, 2]
        # With head_dim 16 and the real theta 5e6 the last frequencies turn by ~1e-6 rad per
        # position, so over a 56-token prompt an error in which of t / h / w drives them is
        # invisible (~1e-6 in the logits). A small theta makes every frequency turn, so the
        # section layout and the theta read from config.json both show in the outputs.
        t["rope_parameters"]["rope_theta"] = 20.0
        c["tie_word_embeddings"] = False
        v = c["vision_config"]
        v.update(
            hidden_size=48,
            depth=4,
            num_heads=3,
            intermediate_size=96,
            patch_size=14,
            spatial_merge_size=2,
            num_position_embeddings=1024,  # 32 x 32 learned grid, bilinearly resampled
            deepstack_visual_indexes=[0, 2, 3],
            out_hidden_size=96,
            initializer_range=STD_MATRIX,
        )
        return c

    def edit_processor(p):
        # patch 14 with merge 2 gives a resize factor of 28; max_pixels 32768 makes smart_resize
        # pick 140 x 196 pixels for the 2200 x 1700 image: a 10 x 14 patch grid, 5 x 7 merged
        # tokens (the shared case has 14 x 18 patches, 7 x 9 tokens).
        for key in ("image_processor", "video_processor"):
            p[key]["patch_size"] = 14
            p[key]["merge_size"] = 2
        p["image_processor"]["size"] = {"longest_edge": 32768, "shortest_edge": 8192}
        return p

    return dict(
        family="qwen3_vl",
        base="qwen3_vl_tiny",
        seed=21,  # picked among 20-23: greedy margins >= 3e-2, 12 distinct tokens
        model_class=Qwen3VLForConditionalGeneration,
        config_class=Qwen3VLConfig,
        edit_config=edit_config,
        edit_processor=edit_processor,
    )


def llava_next_gqa_spec():
    """LLaVA-NeXT with a GQA LLaMA decoder and a CLIP tower of 224-pixel tiles, patch 16."""

    pinpoints = [[224, 448], [448, 224], [448, 448], [448, 672], [672, 448]]

    def edit_config(c):
        t = c["text_config"]
        t.update(
            hidden_size=96,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=3,  # GQA 2:1 (the shared case is MHA)
            head_dim=16,
            intermediate_size=224,
            initializer_range=STD_MATRIX,
        )
        v = c["vision_config"]
        v.update(
            hidden_size=48,
            num_hidden_layers=4,
            num_attention_heads=4,  # head 12
            intermediate_size=112,
            image_size=224,
            patch_size=16,  # 14 x 14 patches + CLS per tile
            projection_dim=48,
            initializer_range=STD_MATRIX,
        )
        # hidden_states[-3] of 5 (embeddings + 4 layers): the output of encoder layer 1
        # (0-based); the real model uses -2.
        c["vision_feature_layer"] = -3
        c["vision_feature_select_strategy"] = "default"
        # (height, width) pinpoints. For the 1700 x 2200 (h x w) image, [448, 672] fits best:
        # a 2 x 3 grid of tiles (non-square), and the anyres unpadding then crops columns
        # (the shared case's 2 x 2 grid crops rows).
        c["image_grid_pinpoints"] = pinpoints
        c["image_seq_length"] = (224 // 16) ** 2
        return c

    def edit_processor(p):
        ip = p["image_processor"]
        ip["crop_size"] = {"height": 224, "width": 224}
        ip["size"] = {"shortest_edge": 224}
        ip["image_grid_pinpoints"] = pinpoints
        p["patch_size"] = 16
        return p

    return dict(
        family="llava_next",
        base="llava_next_tiny",
        seed=24,  # picked among 21-26: greedy margins >= 7e-3, 12 distinct tokens
        model_class=LlavaNextForConditionalGeneration,
        config_class=LlavaNextConfig,
        edit_config=edit_config,
        edit_processor=edit_processor,
    )


CASES = {
    "qwen3_vl_wide": qwen3_vl_wide_spec,
    "llava_next_gqa": llava_next_gqa_spec,
}

MODEL_CLASSES = {
    "qwen3_vl": Qwen3VLForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
}


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def is_norm(module):
    """LayerNorm and the RMSNorm classes of transformers (Qwen3VLTextRMSNorm, LlamaRMSNorm)."""
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def init_weights(model, seed):
    """Overwrite every parameter deterministically from `seed`.

    Parameters are visited in sorted name order with one CPU generator, so the result depends
    only on the seed and the parameter names and shapes. Norm weights are centred on 1 with a
    wide spread and biases are non-zero, so that a loader that drops a norm weight or a bias, or
    swaps two of them, changes the outputs well beyond the tolerances.
    """
    gen = torch.Generator().manual_seed(seed)
    owners = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            owners[f"{mod_name}.{p_name}" if mod_name else p_name] = module
    tables = ("embed_tokens", "pos_embed", "position_embedding", "class_embedding", "image_newline")
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            owner = owners[name]
            if name.endswith("bias"):
                mean, std = 0.0, STD_BIAS
            elif is_norm(owner):
                mean, std = NORM_MEAN, NORM_STD
            elif any(t in name for t in tables):
                mean, std = 0.0, STD_TABLE
            else:
                mean, std = 0.0, STD_MATRIX
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std + mean
            param.copy_(values.to(param.dtype))


def strip_subconfig_dtype(path):
    """save_pretrained writes "dtype" into text_config / vision_config too; the shared config.json
    files carry it only at the top level, so drop the nested copies for an identical layout."""
    with open(path) as f:
        cfg = json.load(f)
    for key in ("text_config", "vision_config"):
        cfg.get(key, {}).pop("dtype", None)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def write_checkpoint(name, spec, shared_dir, out_root):
    """Steps 1-3: config, seeded weights, bf16 checkpoint, tokenizer and processor files."""
    base = os.path.join(shared_dir, spec["base"])
    out = os.path.join(out_root, name)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)

    with open(os.path.join(base, "config.json")) as f:
        cfg_dict = spec["edit_config"](json.load(f))
    cfg_dict.pop("transformers_version", None)
    config = spec["config_class"].from_dict(cfg_dict)

    torch.manual_seed(spec["seed"])  # model construction itself draws random numbers
    model = spec["model_class"](config).eval()
    init_weights(model, spec["seed"])
    model.to(torch.bfloat16)
    model.save_pretrained(out)  # config.json, generation_config.json, model.safetensors
    strip_subconfig_dtype(os.path.join(out, "config.json"))

    # Tokenizer files are the shared case's, byte for byte.
    for fname in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(base, fname), os.path.join(out, fname))

    # Processor: the nested transformers 5 form and the flat form that released checkpoints ship.
    with open(os.path.join(base, "processor_config.json")) as f:
        proc = spec["edit_processor"](json.load(f))
    with open(os.path.join(out, "processor_config.json"), "w") as f:
        json.dump(proc, f, indent=2, sort_keys=True)
        f.write("\n")
    flat = dict(sorted(proc["image_processor"].items()))
    flat["processor_class"] = proc["processor_class"]
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(flat, f, indent=1)
    return out


# --------------------------------------------------------------------------------------------
# Reference outputs
# --------------------------------------------------------------------------------------------


def load_model(folder, family):
    model = MODEL_CLASSES[family].from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def run_processor(folder, image_path, prompt):
    processor = AutoProcessor.from_pretrained(folder)
    image = Image.open(image_path)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    return processor, dict(inputs)


def check_qwen_hidden_state_convention(model, inputs, out, deepstack):
    """Confirm independently (hooks on the decoder layers) what output_hidden_states returns:
    .0 = input of layer 0, .i = raw output of layer i-1 (DeepStack is added after the layer
    returns, outside it), .L = final norm of the last layer's output. Returns the largest
    DeepStack addition, i.e. how much a 'post-DeepStack' convention would differ."""
    lm = model.model.language_model
    seen_in, seen_out = [], []
    hooks = []
    for layer in lm.layers:
        hooks.append(layer.register_forward_pre_hook(lambda m, a, kw=None: seen_in.append(a[0].detach().clone())))
        hooks.append(layer.register_forward_hook(lambda m, a, o: seen_out.append((o[0] if isinstance(o, tuple) else o).detach().clone())))
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    hs = out.hidden_states
    L = len(lm.layers)
    mask = inputs["input_ids"][0] == model.config.image_token_id
    assert torch.equal(hs[0], seen_in[0]), "hidden_states.0 is not the input of layer 0"
    largest_addition = 0.0
    for i in range(1, L):
        assert torch.equal(hs[i], seen_out[i - 1]), f"hidden_states.{i} is not layer {i - 1}'s output"
        expected_next = hs[i][0].clone()
        if i - 1 < len(deepstack):
            expected_next[mask] += deepstack[i - 1]
            largest_addition = max(largest_addition, deepstack[i - 1].abs().max().item())
        assert torch.allclose(seen_in[i][0], expected_next, atol=1e-6, rtol=0), (
            f"layer {i} input is not hidden_states.{i} plus DeepStack {i - 1}"
        )
    assert torch.allclose(hs[L], lm.norm(seen_out[L - 1]), atol=1e-6, rtol=0), "hidden_states.L is not normed"
    return largest_addition


def compute_reference(folder, family, image_path, prompt, check_conventions=True):
    """Step 4: run the float32 eager model on the processor's output; returns (tensors, info)."""
    processor, inputs = run_processor(folder, image_path, prompt)
    model = load_model(folder, family)
    ids = inputs["input_ids"]
    image_token_id = model.config.image_token_id
    image_mask = ids[0] == image_token_id
    t = {}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw", "image_sizes"):
        if key in inputs:
            value = inputs[key]
            t[key] = value.to(torch.int64) if not value.is_floating_point() else value.to(torch.float32)

    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        info = {}
        if family == "qwen3_vl":
            vis = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            t["vision_last_hidden"] = vis.last_hidden_state
            t["image_embeds"] = torch.cat(vis.pooler_output, dim=0)
            deepstack = [torch.cat(f, dim=0) for f in vis.deepstack_features]
            for k, feat in enumerate(deepstack):
                t[f"deepstack.{k}"] = feat
            pos, _ = model.model.get_rope_index(
                ids,
                mm_token_type_ids=inputs["mm_token_type_ids"],
                image_grid_thw=inputs["image_grid_thw"],
                attention_mask=inputs["attention_mask"],
            )
            t["position_ids"] = pos[:, 0, :].to(torch.int64)
            if check_conventions:
                info["largest_deepstack_addition"] = check_qwen_hidden_state_convention(model, inputs, out, deepstack)
        else:
            feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
            t["image_embeds"] = torch.cat(feats.pooler_output, dim=0)
        # image_embeds are exactly the rows spliced into the decoder input.
        assert torch.equal(out.hidden_states[0][0][image_mask], t["image_embeds"]), "image_embeds not spliced as is"

        for i, h in enumerate(out.hidden_states):
            t[f"hidden_states.{i}"] = h[0]
        logits = out.logits[0]
        t["logits_last"] = logits[-N_LOGITS_LAST:].contiguous()
        t["argmax_all"] = logits.argmax(-1).to(torch.int64)
        t["logsumexp_all"] = torch.logsumexp(logits, dim=-1)

        gen = model.generate(
            **inputs,
            max_new_tokens=N_GENERATE,
            min_new_tokens=N_GENERATE,
            do_sample=False,
            output_logits=True,  # raw logits of every step, to report how close greedy ties are
            return_dict_in_generate=True,
        )
        t["generated_ids"] = gen.sequences[0, ids.shape[1]:].to(torch.int64)

    # Top-1 minus top-2 logit: where this is below 2 x logits_atol an implementation that is
    # within tolerance may still pick the other token.
    top2 = logits.topk(2, dim=-1).values
    prompt_margin = top2[:, 0] - top2[:, 1]
    gen_margin = [(s[0].topk(2).values[0] - s[0].topk(2).values[1]).item() for s in gen.logits]
    info["min_prompt_margin"] = prompt_margin.min().item()
    info["near_ties"] = int((prompt_margin < 2 * TOLERANCE["logits_atol"]).sum())
    info["min_generation_margin"] = min(gen_margin)

    info.update(
        sequence_length=int(ids.shape[1]),
        image_tokens=int(image_mask.sum()),
        generated_text=processor.tokenizer.decode(t["generated_ids"]),
    )
    return {k: v.contiguous() for k, v in t.items()}, info


# Key order of case.json "keys", as in the shared cases.
def ordered_keys(tensors):
    head = ["input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw", "image_sizes"]
    hidden = sorted((k for k in tensors if k.startswith("hidden_states.")), key=lambda k: int(k.split(".")[1]))
    tail = ["logits_last", "argmax_all", "logsumexp_all", "position_ids", "vision_last_hidden", "image_embeds"]
    deep = sorted((k for k in tensors if k.startswith("deepstack.")), key=lambda k: int(k.split(".")[1]))
    order = head + hidden + tail + deep + ["generated_ids"]
    return [k for k in order if k in tensors]


def describe(folder):
    """One line of the sizes that matter, read back from the written config.json."""
    with open(os.path.join(folder, "config.json")) as f:
        c = json.load(f)
    t, v = c["text_config"], c["vision_config"]
    s = (
        f"text {t['hidden_size']} wide, {t['num_hidden_layers']} layers, {t['num_attention_heads']} heads / "
        f"{t['num_key_value_heads']} KV heads of {t['head_dim']}, MLP {t['intermediate_size']}, "
        f"vocab {t['vocab_size']}, tied {c.get('tie_word_embeddings')}; vision {v['hidden_size']} wide, "
    )
    if c["model_type"] == "qwen3_vl":
        s += (
            f"depth {v['depth']}, {v['num_heads']} heads, MLP {v['intermediate_size']}, patch {v['patch_size']}, "
            f"merge {v['spatial_merge_size']}, {v['num_position_embeddings']} position embeddings, DeepStack at "
            f"{v['deepstack_visual_indexes']}, out {v['out_hidden_size']}; mrope_section "
            f"{t['rope_parameters']['mrope_section']}, rope_theta {t['rope_parameters']['rope_theta']}"
        )
    else:
        s += (
            f"{v['num_hidden_layers']} layers, {v['num_attention_heads']} heads, MLP {v['intermediate_size']}, "
            f"image {v['image_size']}, patch {v['patch_size']}; feature layer {c['vision_feature_layer']}; "
            f"pinpoints {c['image_grid_pinpoints']}"
        )
    return s


def make_case(name, shared_dir, out_root):
    spec = CASES[name]()
    base = os.path.join(shared_dir, spec["base"])
    with open(os.path.join(base, "case.json")) as f:
        base_case = json.load(f)
    folder = write_checkpoint(name, spec, shared_dir, out_root)
    image_path = os.path.join(shared_dir, IMAGE_DIR_REL, base_case["image"])
    tensors, info = compute_reference(folder, spec["family"], image_path, base_case["prompt"])
    save_file(tensors, os.path.join(folder, "expected.safetensors"))

    note = (
        f"Made by bench/make_hf_cases.py (evl-ecg) with transformers {transformers.__version__} and torch "
        f"{torch.__version__} on CPU: config = {spec['base']}'s config.json with new sizes ({describe(folder)}); "
        f"random init from seed {spec['seed']} (matrices N(0,{STD_MATRIX}), embedding/position tables, CLS and "
        f"image_newline N(0,{STD_TABLE}), biases N(0,{STD_BIAS}), norm weights N({NORM_MEAN},{NORM_STD})), saved "
        f"in bfloat16 with save_pretrained; the reference is the folder reloaded in float32 (bf16 widened), "
        f"eager attention, on the processor output for {spec['base']}'s image and prompt; tokenizer files "
        f"copied from {spec['base']}. Greedy top-1 minus top-2 logit: at least {info['min_generation_margin']:.2g} "
        f"over the 12 generated tokens; over the prompt at least {info['min_prompt_margin']:.2g}, below "
        f"{2 * TOLERANCE['logits_atol']:g} at {info['near_ties']} of {info['sequence_length']} positions (argmax_all "
        f"may legitimately differ there)."
    )
    case = {
        "family": spec["family"],
        "variant": "extra",
        "seed": spec["seed"],
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "image": base_case["image"],
        "image_size_wh": list(Image.open(image_path).size),
        "prompt": base_case["prompt"],
        "weights_dtype": "bfloat16",
        "compute_dtype": "float32",
        "attention": "eager",
        "sequence_length": info["sequence_length"],
        "image_tokens": info["image_tokens"],
        "generated_text": info["generated_text"],
        "keys": {k: list(tensors[k].shape) for k in ordered_keys(tensors)},
        "tolerance": TOLERANCE,
        "note": note,
    }
    with open(os.path.join(folder, "case.json"), "w") as f:
        json.dump(case, f, indent=1)
    for fname in os.listdir(folder):  # save_pretrained / save_file leave some files 0600
        os.chmod(os.path.join(folder, fname), 0o644)
    print(f"[{name}] {folder}: seq {info['sequence_length']}, image tokens {info['image_tokens']}")
    print(f"  {describe(folder)}")
    print(f"  greedy margin >= {info['min_generation_margin']:.3g}; prompt margin >= {info['min_prompt_margin']:.3g}, "
          f"{info['near_ties']} prompt positions below {2 * TOLERANCE['logits_atol']:g}")
    if "largest_deepstack_addition" in info:
        print(f"  hidden-state convention verified (largest DeepStack addition {info['largest_deepstack_addition']:.3g})")
    for k in ordered_keys(tensors):
        v = tensors[k]
        extra = f" |max| {v.abs().max().item():.3g}" if v.is_floating_point() else ""
        print(f"  {k:22s} {str(v.dtype):14s} {list(v.shape)}{extra}")
    return folder


def check_shared(shared_dir):
    """Recompute the shared cases with this script's procedure and compare with their files."""
    ok = True
    for name in ("qwen3_vl_tiny", "llava_next_tiny"):
        folder = os.path.join(shared_dir, name)
        with open(os.path.join(folder, "case.json")) as f:
            case = json.load(f)
        image_path = os.path.join(shared_dir, IMAGE_DIR_REL, case["image"])
        tensors, info = compute_reference(folder, case["family"], image_path, case["prompt"])
        expected = load_file(os.path.join(folder, "expected.safetensors"))
        print(f"[check-shared {name}] seq {info['sequence_length']} (case.json {case['sequence_length']}), "
              f"image tokens {info['image_tokens']} ({case['image_tokens']}), "
              f"generated_text equal: {info['generated_text'] == case['generated_text']}; greedy margin >= "
              f"{info['min_generation_margin']:.3g}, {info['near_ties']} prompt positions with margin below "
              f"{2 * TOLERANCE['logits_atol']:g} (min {info['min_prompt_margin']:.3g})")
        if set(tensors) != set(expected):
            ok = False
            print(f"  key sets differ: ours only {sorted(set(tensors) - set(expected))}, "
                  f"shared only {sorted(set(expected) - set(tensors))}")
        for k in sorted(set(tensors) & set(expected)):
            a, b = tensors[k], expected[k]
            if a.shape != b.shape or a.dtype != b.dtype:
                ok = False
                print(f"  {k}: shape/dtype {list(a.shape)} {a.dtype} vs {list(b.shape)} {b.dtype}")
                continue
            if a.is_floating_point():
                d = (a - b).abs().max().item()
                ok &= d <= 1e-5
                print(f"  {k:22s} max |diff| {d:.3g}")
            else:
                same = torch.equal(a, b)
                ok &= same
                print(f"  {k:22s} {'identical' if same else 'DIFFERENT'}")
    print("check-shared:", "all match" if ok else "MISMATCH")
    return ok


# --------------------------------------------------------------------------------------------
# Sensitivity: how far typical implementation mistakes move the reference.
# --------------------------------------------------------------------------------------------


def tiled_repeat_kv(hidden_states, n_rep):
    """A wrong GQA mapping: query head h uses KV head h % n_kv instead of h // n_rep."""
    return hidden_states.repeat(1, n_rep, 1, 1)


def rotate_pairs(x):
    """A wrong RoPE pairing (GPT-J style): rotates (x[2i], x[2i+1]) instead of (x[i], x[i+d/2])."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def chunked_mrope(self, freq):
    """Qwen2-VL's non-interleaved layout: [t]*s_t + [h]*s_h + [w]*s_w over the half dim."""
    parts, start = [], 0
    for dim, size in enumerate(self.mrope_section):
        parts.append(freq[dim, ..., start:start + size])
        start += size
    half = torch.cat(parts, dim=-1)
    return torch.cat((half, half), dim=-1)


def sensitivity(name, out_root, shared_dir):
    import transformers.models.llama.modeling_llama as llama_mod
    import transformers.models.qwen3_vl.modeling_qwen3_vl as qwen_mod

    folder = os.path.join(out_root, name)
    with open(os.path.join(folder, "case.json")) as f:
        case = json.load(f)
    expected = load_file(os.path.join(folder, "expected.safetensors"))
    image_path = os.path.join(shared_dir, IMAGE_DIR_REL, case["image"])
    _, inputs = run_processor(folder, image_path, case["prompt"])
    L = max(int(k.split(".")[1]) for k in expected if k.startswith("hidden_states."))

    def measure(label, model):
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
        dl = (out.logits[0, -N_LOGITS_LAST:] - expected["logits_last"]).abs().max().item()
        dh = (out.hidden_states[L][0] - expected[f"hidden_states.{L}"]).abs().max().item()
        changed = int((out.logits[0].argmax(-1) != expected["argmax_all"]).sum())
        print(f"  {label:38s} max|d logits_last| {dl:9.3g}  max|d hidden_states.{L}| {dh:9.3g}  "
              f"argmax changed at {changed}/{case['sequence_length']}")

    print(f"[sensitivity {name}] tolerances: logits {TOLERANCE['logits_atol']}, hidden {TOLERANCE['hidden_atol']}")
    model = load_model(folder, case["family"])
    measure("(none: reference rerun)", model)
    if case["family"] == "qwen3_vl":
        saved = qwen_mod.repeat_kv
        qwen_mod.repeat_kv = tiled_repeat_kv
        measure("GQA heads tiled (h % n_kv)", model)
        qwen_mod.repeat_kv = saved

        rotary = model.model.language_model.rotary_emb
        rotary.recomposition_frequencies = chunked_mrope.__get__(rotary)
        measure("M-RoPE chunked, not interleaved", model)
        del rotary.recomposition_frequencies

        sections = rotary.mrope_section
        rotary.mrope_section = [4, 2, 2]
        measure("M-RoPE sections [4,2,2]", model)
        rotary.mrope_section = sections

        model.model.visual.interpolation_align_corners = False
        measure("position grid: align_corners False", model)
        model.model.visual.interpolation_align_corners = True

        lm = model.model.language_model
        lm._deepstack_process = lambda h, mask, emb: h
        measure("DeepStack not added", model)
        del lm._deepstack_process
    else:
        saved, saved_rotate = llama_mod.repeat_kv, llama_mod.rotate_half
        llama_mod.repeat_kv = tiled_repeat_kv
        measure("GQA heads tiled (h % n_kv)", model)
        llama_mod.repeat_kv = saved

        llama_mod.rotate_half = rotate_pairs
        measure("RoPE on (2i, 2i+1) pairs, not halves", model)
        llama_mod.rotate_half = saved_rotate

        layer = model.config.vision_feature_layer
        model.config.vision_feature_layer = -2
        measure("CLIP feature layer -2 instead of -3", model)
        model.config.vision_feature_layer = layer

        newline = model.model.image_newline.data.clone()
        model.model.image_newline.data.zero_()
        measure("image_newline zeroed", model)
        model.model.image_newline.data.copy_(newline)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default="/work/shared/hf", help="folder of the shared cases")
    ap.add_argument("--out", default="/work/hf-extra", help="where to write the new case folders")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--check-shared", action="store_true", help="only verify the procedure on the shared cases")
    ap.add_argument("--sensitivity", action="store_true", help="also measure the effect of deliberate mistakes")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    if args.check_shared:
        sys.exit(0 if check_shared(args.shared) else 1)
    for name in args.cases:
        make_case(name, args.shared, args.out)
    if args.sensitivity:
        for name in args.cases:
            sensitivity(name, args.out, args.shared)


if __name__ == "__main__":
    main()
