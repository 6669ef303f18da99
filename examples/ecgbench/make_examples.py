"""Example prediction file for `evl-ecg score ecgbench --task ecgqa` on the 20 ECG-QA items
whose records ship in ../shared/data: a trivial baseline that always answers the first
option ("no" for verification questions). Prompts carry the options the way PULSE's ECG-QA
prompts do (`... Options: a, b, c`). Run from the repository root.
"""
import csv
import json
import os

base = os.path.join("..", "shared", "data", "ecgbench_formats", "ecgqa")
items = json.load(open(os.path.join(base, "ecgqa_items_for_local_ptbxl_records.json")))
classes = {}
with open(os.path.join(base, "ptbxl", "answers_for_each_template.csv")) as f:
    for row in csv.DictReader(f):
        classes[int(row["template_id"])] = [c.strip(" '") for c in row["classes"].strip("[]").split(",")]
with open(os.path.join("examples", "ecgbench", "ecgqa_first_option.jsonl"), "w") as out:
    for it in items:
        opts = classes.get(it["template_id"], ["yes", "no"])
        prompt = f"{it['question']} Options: {', '.join(opts)}. Only answer based on the given Options without any explanation."
        out.write(json.dumps({"question_id": it["sample_id"], "prompt": prompt, "text": opts[0]}) + "\n")
