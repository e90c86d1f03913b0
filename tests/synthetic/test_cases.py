"""Cases of the lesion cohort: how they are planned and written, how a model's answers about them are scored,
and the baselines on the same cases."""

from collections import Counter

import numpy as np
import pytest
import torch

from chatexaonepath.chat.conversation import IMAGE_TOKEN, slide_label
from chatexaonepath.eval.stats import wilson_interval
from chatexaonepath.synthetic import baselines as B
from chatexaonepath.synthetic import scores
from chatexaonepath.synthetic.lesions import (
    CASE_QUESTIONS, CASE_SIZES, DIAGNOSIS_ANSWERS, NO_LESION, NO_SLIDE_ANSWER, LesionCase, LesionCohortConfig,
    case_answers, lesion_records, plan_cases, plan_lesion_cohort,
)
from chatexaonepath.synthetic.scores import CaseView, case_answer_correct, case_derangement, named_slides, score_cases
from chatexaonepath.vision_tower.features import SlideFeatures


@pytest.fixture(scope="module")
def slides():
    return plan_lesion_cohort(LesionCohortConfig())  # the default cohort's plan: nothing is painted


def test_cases_hold_two_or_three_slides_of_one_organ_and_split_and_at_most_one_lesion(slides):
    by_id = {s.slide_id: s for s in slides}
    cases = plan_cases(slides)
    assert [c.case_id for c in plan_cases(slides)] == [c.case_id for c in cases]  # the same cohort, the same cases
    assert len({c.case_id for c in cases}) == len(cases)
    for case in cases:
        members = [by_id[sid] for sid in case.slide_ids]
        assert len(members) in CASE_SIZES and len(set(case.slide_ids)) == len(members)
        assert {s.split for s in members} == {case.split} and {s.organ for s in members} == {case.organ}
        lesions = [i for i, s in enumerate(members, 1) if s.diagnosis != NO_LESION]
        assert lesions == ([case.lesion_slide] if case.lesion_slide else [])
        assert case.diagnosis == (members[case.lesion_slide - 1].diagnosis if case.lesion_slide else NO_LESION)
    # every lesion slide is the lesion of exactly one case; each split has cases of both sizes
    assert Counter(c.slide_ids[c.lesion_slide - 1] for c in cases if c.lesion_slide) == Counter(
        {s.slide_id: 1 for s in slides if s.diagnosis != NO_LESION})
    assert {len(c.slide_ids) for c in cases if c.split == "test" and c.lesion_slide} == set(CASE_SIZES)
    assert any(c.lesion_slide is None for c in cases if c.split == "test")  # some cases carry none
    # the lesion is not always at the same place: each position of each size is used
    assert {(len(c.slide_ids), c.lesion_slide) for c in cases if c.lesion_slide} == {
        (n, k) for n in CASE_SIZES for k in range(1, n + 1)}


def test_case_records_ask_which_slide_and_the_diagnosis_in_their_slides_split(slides):
    files = lesion_records(slides)
    split = {s.slide_id: s.split for s in slides}
    cases = {c.case_id: c for c in plan_cases(slides)}
    for name, wanted in (("instruct.json", "train"), ("val_instruct.json", "val"), ("test.json", "test")):
        records = [r for r in files[name] if isinstance(r["image"], list)]
        first_case = next(i for i, r in enumerate(files[name]) if isinstance(r["image"], list))
        assert all(isinstance(r["image"], list) for r in files[name][first_case:])  # after every slide's records
        assert {c.split for c in cases.values() if c.split == wanted} and records
        for record in records:
            case = cases[record["id"].rsplit("-", 1)[0]]
            assert record["image"] == [f"{sid}.tiff" for sid in case.slide_ids]
            assert {split[name[:-len(".tiff")]] for name in record["image"]} == {wanted}
            turns = record["conversations"]
            assert turns[0]["value"].startswith(f"{IMAGE_TOKEN}\n") and sum(IMAGE_TOKEN in t["value"] for t in turns) == 1
            for question, answer in zip(turns[::2], turns[1::2]):
                asked = question["value"].split("\n")[-1]
                category = next(q for q, phrasings in CASE_QUESTIONS.items() if asked in phrasings)
                if wanted == "test":
                    assert asked == CASE_QUESTIONS[category][0] and len(turns) == 2
                assert case_answer_correct(answer["value"], case, category)
    which = {c.case_id: case_answers(c)["which_slide"] for c in cases.values()}
    for case in cases.values():  # the slide is named as its label names it to the LLM
        if case.lesion_slide:
            label = slide_label(case.lesion_slide, case.names[case.lesion_slide - 1])
            assert which[case.case_id] == label[:-1] + "."
        else:
            assert which[case.case_id] == NO_SLIDE_ANSWER
    phrasings = {t["value"].split("\n")[-1] for r in files["instruct.json"] if isinstance(r["image"], list)
                 for t in r["conversations"][::2]}
    assert phrasings == {p for q in CASE_QUESTIONS.values() for p in q}  # training sees every paraphrase


def test_which_slide_is_right_only_when_the_answer_names_that_slide_alone():
    case = LesionCase("case-0001", "colon", "test", ("les-0004", "les-0009", "les-0002"), 2, "melanoma")
    assert named_slides("Slide 2 (les-0009.tiff).", case.names) == {2}
    assert named_slides("The lesion is on les-0002.tiff.", case.names) == {3}
    assert case_answer_correct("Slide 2.", case, "which_slide")
    assert not case_answer_correct("Slide 2 (les-0004.tiff).", case, "which_slide")  # number and name disagree
    assert not case_answer_correct("Slide 1 or slide 2.", case, "which_slide")
    assert not case_answer_correct(NO_SLIDE_ANSWER, case, "which_slide")
    assert not case_answer_correct("Slide 12.", case, "which_slide")
    none = LesionCase("case-0002", "colon", "test", ("les-0004", "les-0002"), None, NO_LESION)
    assert case_answer_correct(NO_SLIDE_ANSWER, none, "which_slide")
    assert not case_answer_correct("Slide 1 (les-0004.tiff).", none, "which_slide")
    assert case_answer_correct("Melanoma.", case, "case_diagnosis")
    assert not case_answer_correct("Melanoma or adenocarcinoma.", case, "case_diagnosis")
    assert case_answer_correct(DIAGNOSIS_ANSWERS[NO_LESION], none, "case_diagnosis")


class Session:
    """A stand-in chat session that answers from the slides it was given: the slide named `*-lesion` is the
    lesion slide, and a case with one is a melanoma."""

    def __init__(self, log):
        self.names, self.log, self.turns = [], log, 0

    def use_features(self, features, name, add=False):
        self.names = [*self.names, name] if add else [name]

    def reset(self):
        self.turns = 0

    def ask(self, question):
        assert self.turns == 0  # every case question starts a fresh conversation
        self.turns += 1
        self.log.append((tuple(self.names), question))
        lesion = [i for i, n in enumerate(self.names, 1) if "lesion" in n]
        if question == CASE_QUESTIONS["which_slide"][0]:
            text = f"Slide {lesion[0]}." if lesion else NO_SLIDE_ANSWER
        else:
            text = "Melanoma." if lesion else DIAGNOSIS_ANSWERS[NO_LESION]
        return type("Answer", (), {"text": text})()


def _case_view() -> CaseView:
    cases = [LesionCase("case-0000", "colon", "test", ("a", "b-lesion"), 2, "melanoma"),
             LesionCase("case-0001", "colon", "test", ("c-lesion", "a", "d"), 1, "melanoma"),
             LesionCase("case-0002", "colon", "test", ("a", "d"), None, NO_LESION),
             LesionCase("case-0003", "colon", "test", ("e-lesion", "d"), 1, "adenocarcinoma")]
    bag = SlideFeatures(torch.zeros(2, 4), torch.zeros(2, 2, dtype=torch.long), {}, None)
    return CaseView(cases, {sid: bag for c in cases for sid in c.slide_ids})


def test_cases_are_asked_as_the_app_asks_them_and_scored_with_a_wilson_interval(monkeypatch):
    log = []
    monkeypatch.setattr(scores, "session_for", lambda model, max_new_tokens=24: Session(log))
    view = _case_view()
    score = score_cases(None, view)
    assert log[:2] == [(("a.tiff", "b-lesion.tiff"), CASE_QUESTIONS["case_diagnosis"][0]),
                       (("a.tiff", "b-lesion.tiff"), CASE_QUESTIONS["which_slide"][0])]
    assert score.counts("which_slide") == (4, 4) and score.counts("case_diagnosis") == (3, 4)  # case 3: adeno
    assert score.accuracy == {"case_diagnosis": 0.75, "which_slide": 1.0}
    assert score.interval("case_diagnosis") == wilson_interval(3, 4)
    # the shuffled control: another case's slides answer, scored against the asked case's truth
    mapping = case_derangement(view.cases, seed=0)
    assert all(a != b for a, b in mapping.items()) and set(mapping) == {c.case_id for c in view.cases}
    sizes = {c.case_id: len(c.slide_ids) for c in view.cases}
    assert all(sizes[a] == sizes[b] for a, b in mapping.items() if a != "case-0001")  # the only 3-slide case
    shuffled = score_cases(None, view, answer_from=mapping)
    assert shuffled.counts("which_slide")[0] < 4
    assert {a["case"]: a["truth"] for a in shuffled.answers if a["category"] == "which_slide"} == {
        "case-0000": 2, "case-0001": 1, "case-0002": NO_LESION, "case-0003": 1}


def _probabilities(truth: dict[str, str], sharp: float) -> dict[str, dict[str, float]]:
    classes = ("adenocarcinoma", "melanoma", NO_LESION)
    return {sid: {c: sharp if c == t else (1 - sharp) / 2 for c in classes} for sid, t in truth.items()}


def test_the_case_rule_names_the_likeliest_lesion_slide_or_none_past_a_threshold_chosen_on_validation():
    view = _case_view()
    truth = {"a": NO_LESION, "b-lesion": "melanoma", "c-lesion": "melanoma", "d": NO_LESION,
             "e-lesion": "adenocarcinoma"}
    right = B.case_rule_baseline(_probabilities(truth, 0.8), view.cases, view.cases)
    assert {q: a.value for q, a in right.items()} == {"which_slide": 1.0, "case_diagnosis": 1.0}
    assert right["which_slide"].total == 4 and right["which_slide"].interval == wilson_interval(4, 4)
    # probabilities that tell the slides nothing leave a fixed answer: slide 1 (the first of equals), right for
    # the two cases whose lesion is there, chosen on validation over "none", right for one
    blind = _probabilities({sid: NO_LESION for sid in truth}, 0.8)
    assert B.case_rule_baseline(blind, view.cases, view.cases)["which_slide"].correct == 2
    prediction = B.case_prediction(_probabilities(truth, 0.8), view.cases[1], threshold=0.95)
    assert prediction == {"which_slide": NO_LESION, "case_diagnosis": NO_LESION}


def test_the_baselines_extend_to_cases_on_the_same_splits():
    rng = np.random.default_rng(0)
    labels, features, colour = {}, {}, {}
    types = ("adenocarcinoma", "melanoma", NO_LESION)
    views, cases = {}, []
    for split, n in (("train", 18), ("val", 9), ("test", 9)):
        ids = [f"{split}-{i}" for i in range(n)]
        for i, sid in enumerate(ids):
            diagnosis = types[i % 3]
            x = rng.normal(0, 1, (20, 8))
            x[:, types.index(diagnosis)] += 3.0  # the mean feature tells the diagnosis
            labels[sid] = {"slide_id": sid, "organ": "colon", "diagnosis": diagnosis, "grade": "", "margins": "",
                           "split": split}
            features[sid] = SlideFeatures(torch.tensor(x, dtype=torch.float32), torch.zeros(20, 2, dtype=torch.long),
                                          {})
            colour[sid] = {"moments": rng.normal(0, 1, (20, 6))}  # colour tells nothing
        views[split] = B.SplitView(ids, {s: labels[s] for s in ids}, {s: features[s] for s in ids},
                                   {s: colour[s] for s in ids}, {s: np.zeros(20) for s in ids})
        for k in range(0, n, 3):  # (adeno, normal), (normal, melanoma), and (normal, normal) once
            cases.append(LesionCase(f"{split}-c{k}", "colon", split, (ids[k], ids[k + 2]), 1, "adenocarcinoma"))
            cases.append(LesionCase(f"{split}-d{k}", "colon", split, (ids[k + 2], ids[k + 1]), 2, "melanoma"))
        cases.append(LesionCase(f"{split}-n", "colon", split, (ids[2], ids[5]), None, NO_LESION))
    assert B.cases_in(views["test"], cases) == [c for c in cases if c.split == "test"]
    pooled = B.mean_pooled_case_baseline(views, cases)
    assert pooled["which_slide"].total == 7 and pooled["which_slide"].value >= 0.85
    assert pooled["case_diagnosis"].value >= 0.85
    variants = B.colour_case_baseline(views, cases)
    assert len(variants) == 6 and all(v["which_slide"].total == 7 for v in variants.values())
    name, best = B.best_variant(variants, "case_diagnosis")
    assert best.value == max(v["case_diagnosis"].value for v in variants.values()) and name in variants
    abmil = B.AbmilResult({}, float("nan"), float("nan"), 1, 1.0,
                          diagnosis_probabilities=_probabilities({s: labels[s]["diagnosis"] for s in labels}, 0.9))
    assert B.abmil_case_baseline(abmil, views, cases)["which_slide"].value == 1.0
