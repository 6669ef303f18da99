"""Parity cases for `evl-ecg score ecgbench`, scored by the published PULSE script.

Usage (from the repository root):
    pip install scikit-learn numpy
    python3 crates/evl-eval/tests/parity/make_parity.py /path/to/evaluate_ecgbench.py

The script is PULSE's `evaluation/evaluate_ecgbench.py` (we used the copy in
github.com/hongdangn/PULSE at commit 8b9453c, which reads gold files from ./data/ECGBench and
keys MMMU by `id`). It is imported, never copied. This file writes, under cases/<task>/,
a gold file (ECG-Bench item JSON) and a prediction file (PULSE output JSONL) that exercise the
quirks (ABNORMAL matching NORM, "ST" inside "STD", CODE-15% "Answer:" tails, classes never
predicted, classes with a single gold value, every branch of the letter cascade, unparsable
answers drawn by random.choice, ECG-QA prompts as strings and dicts), runs the script's
eval_* function on each, and records what it computes at full precision in expected.json.
`random.seed(42)` is called before each task, as our scorer seeds once per run.
"""
import contextlib
import importlib.util
import io
import json
import os
import random
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = os.path.join(HERE, "cases")

rng = random.Random(2026)  # case generation only


def conv(i, gold, key="id"):
    return {key: i, "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": gold}]}


def multilabel_case(space, extra_texts):
    gold, pred = [], []
    for i in range(120):
        k = rng.randint(1, 3)
        labels = rng.sample(space, k)
        gold_text = ", ".join(labels)
        if rng.random() < 0.1:
            gold_text = "ABNORMAL ECG with " + gold_text
        gold.append(conv(f"q{i}", gold_text))
        r = rng.random()
        if r < 0.5:
            p = ", ".join(labels)
        elif r < 0.8:
            p = ", ".join(rng.sample(space, rng.randint(0, 2)))
        else:
            p = rng.choice(extra_texts)
        pred.append({"question_id": f"q{i}", "text": p, "prompt": "What is the diagnosis?"} if i % 2 else
                    {"id": f"q{i}", "response": p})
    return gold, pred


def code15_case():
    space = ["1dAVb", "RBBB", "LBBB", "SB", "ST", "AF"]
    gold, pred = [], []
    texts = ["Answer: NORM", "NORMAL sinus rhythm. Answer: ABNORMAL, ST", "Answer: STD and AF",
             "ABNORMAL", "NORM", "The ECG shows RBBB. Answer: LBBB", "SB, 1dAVb", "nothing",
             "Answer: NORMAL", "ST elevation"]
    for i in range(150):
        r = rng.random()
        if r < 0.3:
            g = "NORM"
        elif r < 0.45:
            g = "ABNORMAL"
        else:
            g = ", ".join(rng.sample(space, rng.randint(1, 2)))
        gold.append(conv(f"c{i}", g))
        pred.append({"question_id": f"c{i}", "text": rng.choice(texts + [g, "Answer: " + g])})
    return gold, pred


def choice_case(n, letters, prefix, key="id"):
    gold, pred = [], []
    styles = [lambda c: c, lambda c: f"{c}. the answer", lambda c: f"The correct option is {c}",
              lambda c: f"Reasoning... Answer: {c}", lambda c: "I cannot tell",
              lambda c: "The correct option is z", lambda c: f"Answer: option {c.lower()}"]
    for i in range(n):
        g = rng.choice(letters)
        gv = g if key == "id" and prefix == "m" else f"{g}. some finding"
        gold.append(conv(f"{prefix}{i}", gv, key))
        c = g if rng.random() < 0.6 else rng.choice(letters)
        pred.append({"question_id": f"{prefix}{i}", "text": rng.choice(styles)(c)})
    return gold, pred


def ecgqa_case():
    gold, pred = [], []
    opts = ["none", "left bundle branch block", "sinus rhythm", "atrial fibrillation", "st depression"]
    for i in range(80):
        ans = rng.sample(opts, rng.randint(1, 2))
        g = ans if i % 5 else ans[0]  # some string gold values (the set-of-characters quirk)
        gold.append(conv(f"e{i}", g))
        prompt = f"Which findings are present? Options: {', '.join(opts)}. Only answer based on the given Options without any explanation."
        r = rng.random()
        text = ", ".join(ans) if r < 0.5 else ", ".join(rng.sample(opts, rng.randint(0, 3))).upper()
        item = {"question_id": f"e{i}", "text": text}
        item["prompt"] = {"prompt": prompt} if i % 3 == 0 else prompt
        pred.append(item)
    return gold, pred


def main():
    script = sys.argv[1]
    spec = importlib.util.spec_from_file_location("evaluate_ecgbench", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    captured = {}
    original = mod.compute_f1_auc

    def wrapper(y_pred, y_true):
        f1, auc, hl = original(y_pred, y_true)
        captured["f1"], captured["auc"], captured["hl"] = f1, auc, hl
        return f1, auc, hl

    mod.compute_f1_auc = wrapper
    tasks = {
        "ptb": ("ptb-test", multilabel_case(["NORM", "MI", "STTC", "CD", "HYP"],
                                            ["ABNORMAL ECG", "no MI", "STTC and CD", "Normal", ""]), mod.eval_ptb_test),
        "cpsc": ("cpsc-test", multilabel_case(["NORM", "AF", "I-AVB", "LBBB", "RBBB", "PAC", "PVC", "STD", "STE"],
                                              ["AFL", "ST changes", "STD STE", "abnormal"]), mod.eval_cpsc_test),
        "code15": ("code15-test", code15_case(), mod.eval_code15_test),
        "csn": ("csn-test-no-cot", choice_case(1611, list("ABCDEFGH"), "s"), mod.eval_csn_test),
        "g12": ("g12-test-no-cot", choice_case(2026, list("ABCDEFGH"), "g"), mod.eval_g12_test),
        "mmmu": ("mmmu-ecg", choice_case(200, list("ABCD"), "m"), mod.eval_mmmu),
        "ecgqa": ("ecgqa-test", ecgqa_case(), mod.eval_ecgqa_test),
    }
    # One task whose gold has a class present in every item: its AUC is NaN.
    g, p = multilabel_case(["NORM", "MI", "STTC", "CD", "HYP"], ["x"])
    for item in g:
        item["conversations"][1]["value"] += ", HYP"
    tasks["ptb_nan"] = ("ptb-test", (g, p), mod.eval_ptb_test)

    expected = {"script": os.path.basename(script), "tasks": {}}
    for name, (stem, (gold, pred), fn) in tasks.items():
        d = os.path.join(CASES, name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "gold.json"), "w") as f:
            json.dump(gold, f)
        with open(os.path.join(d, "pred.jsonl"), "w") as f:
            for it in pred:
                f.write(json.dumps(it) + "\n")
        work = tempfile.mkdtemp()
        try:
            os.makedirs(os.path.join(work, "data", "ECGBench"))
            shutil.copy(os.path.join(d, "gold.json"), os.path.join(work, "data", "ECGBench", stem + ".json"))
            out_dir = os.path.join(work, "out", stem)
            os.makedirs(out_dir)
            shutil.copy(os.path.join(d, "pred.jsonl"), os.path.join(out_dir, f"{stem}_model.jsonl"))
            cwd = os.getcwd()
            os.chdir(work)
            random.seed(42)
            captured.clear()
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                fn(os.path.join(work, "out", stem))
            os.chdir(cwd)
        finally:
            shutil.rmtree(work)
        text = buf.getvalue()
        res = {"printed": text}
        if captured:
            res.update({k: (None if v != v else float(v)) for k, v in captured.items()})
        else:
            for line in text.splitlines():
                if "Accuracy:" in line and "Model" not in line:
                    res["accuracy"] = float(line.split("Accuracy:")[-1])
                elif " accuracy " in line:
                    res["accuracy"] = float(line.split(" accuracy ")[-1])
        expected["tasks"][name] = res
        print(name, {k: v for k, v in res.items() if k != "printed"}, file=sys.stderr)
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)


if __name__ == "__main__":
    main()
