"""Closed-ended test sets in the exact shapes WSI-Bench and SlideBench-VQA ship (our own wording).

WSI-Bench: a JSON list of LLaVA records, `"image": "TCGA-<project>/<slide>.pt"`, the options inline
after the question (`A) … B) … C) … D) …`, sometimes with runs of spaces), the answer a bare letter;
prognosis files ask yes/no questions answered `Yes` / `No`. SlideBench-VQA: a CSV with the columns
SlideChat's test script reads. Features are extracted here as `<slide>.h5`, flat — not where the
shipped `image` paths point — as a user of this project would have them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .conftest import make_features

# Five slides of four patients (TCGA-A1-0001 has two slides), across two projects.
SLIDES = {
    "TCGA-A1-0001-01Z-00-DX1.1A2B3C4D-0000-4000-8000-000000000001": "TCGA-BRCA",
    "TCGA-A1-0001-01Z-00-DX2.1A2B3C4D-0000-4000-8000-000000000002": "TCGA-BRCA",
    "TCGA-B2-0002-01Z-00-DX1.1A2B3C4D-0000-4000-8000-000000000003": "TCGA-BRCA",
    "TCGA-C3-0003-01Z-00-DX1.1a2b3c4d-0000-4000-8000-000000000004": "TCGA-LUSC",
    "TCGA-D4-0004-01Z-00-DX1.1a2b3c4d-0000-4000-8000-000000000005": "TCGA-LUSC",
}
TYPING = ("Based on the observed features, what is the histological type of the tumour? A) Adenocarcinoma "
          "B) Squamous cell carcinoma, keratinizing type C) Squamous cell carcinoma, non-keratinizing type "
          "D) Small cell carcinoma")
GRADING = ("What is the grade of this tumour by its differentiation?   A) Well differentiated (Grade 1)   "
           "B) Moderately differentiated (Grade 2)   C) Poorly differentiated (Grade 3)   D) Undifferentiated (Grade 4)")
PROGNOSIS = ("Given the diagnosis of invasive ductal carcinoma, Nottingham grade 2, TNM stage T1N0M0, and "
             "IHC showing ER positive, is the prognosis good?")


def record(slide: str, n: int, question: str, answer: str) -> dict:
    return {"id": f"{slide}-{n}", "image": f"{SLIDES[slide]}/{slide}.pt",
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


def write_wsi_bench(root: Path) -> tuple[Path, Path]:
    """Diagnosis_choice_test.json (2 questions per slide) and Prognosis_TF_question_test.json (1 per slide)."""
    choice, tf = [], []
    for k, slide in enumerate(SLIDES):
        choice += [record(slide, 1, TYPING, "BCDAC"[k]), record(slide, 2, GRADING, "ABCDB"[k])]
        tf.append(record(slide, 1, PROGNOSIS, ["Yes", "No"][k % 2]))
    (root / "Diagnosis_choice_test.json").write_text(json.dumps(choice, indent=4))
    (root / "Prognosis_TF_question_test.json").write_text(json.dumps(tf, indent=4))
    return root / "Diagnosis_choice_test.json", root / "Prognosis_TF_question_test.json"


def write_slidebench(root: Path) -> Path:
    """SlideBench-VQA (TCGA)-shaped CSV: one question per slide, answers as letters and as option text."""
    path = root / "SlideBench-VQA-TCGA.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "Slide", "Tumor", "Broad Category", "Narrow Category", "Question", "A", "B", "C", "D",
                         "Answer"])
        for k, (slide, project) in enumerate(SLIDES.items()):
            writer.writerow([str(k + 1), slide, project.split("-")[1], "Diagnosis", "Histological typing",
                             "Which histological subtype does this slide show?", "Invasive ductal carcinoma",
                             "Invasive lobular carcinoma", "Mucinous carcinoma, with a comma", "Medullary carcinoma",
                             "A" if k % 2 else "Invasive lobular carcinoma"])
    return path


def write_features(root: Path) -> Path:
    """<slide>.h5 for every slide, flat in one folder; SlideBench's tumour subfolder holds one of them."""
    folder = root / "features"
    for k, slide in enumerate(SLIDES):
        make_features(folder, slide, 6 + k, seed=k)
    return folder
