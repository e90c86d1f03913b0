"""Options inside shipped questions, and the choice inside free-text answers of the shapes models give."""

import pytest

from chatexaonepath.eval.choices import extract_choice, letter_answer, split_options, yes_no_answer

from .closed_fixtures import GRADING, TYPING

OPTIONS = {"A": "Adenocarcinoma", "B": "Squamous cell carcinoma, keratinizing type",
           "C": "Squamous cell carcinoma, non-keratinizing type", "D": "Small cell carcinoma"}
YES_NO = {"Yes": "Yes", "No": "No"}


@pytest.mark.parametrize("question,stem,options", [
    (TYPING, "Based on the observed features, what is the histological type of the tumour?", OPTIONS),
    (GRADING, "What is the grade of this tumour by its differentiation?",  # runs of spaces, parentheses inside options
     {"A": "Well differentiated (Grade 1)", "B": "Moderately differentiated (Grade 2)",
      "C": "Poorly differentiated (Grade 3)", "D": "Undifferentiated (Grade 4)"}),
    ("Which grade? A) Grade 1 (G1) B) Grade 2 (G2) C) Grade 3 (G3) D) Grade 4 (G4)", "Which grade?",
     {"A": "Grade 1 (G1)", "B": "Grade 2 (G2)", "C": "Grade 3 (G3)", "D": "Grade 4 (G4)"}),
    ("Which one?\nA. Lauren's diffuse type\nB. Lauren's intestinal type\nC. Mixed", "Which one?",
     {"A": "Lauren's diffuse type", "B": "Lauren's intestinal type", "C": "Mixed"}),
    ("Pick: (A) hepatocellular carcinoma (B) cholangiocarcinoma", "Pick:",
     {"A": "hepatocellular carcinoma", "B": "cholangiocarcinoma"}),
    ("Is vascular invasion (type B) present? A) Yes B) No", "Is vascular invasion (type B) present?",
     {"A": "Yes", "B": "No"}),  # a stray "B)" before the options neither starts nor breaks them
])
def test_options_are_read_as_benchmarks_ship_them(question, stem, options):
    assert split_options(question) == (stem, options)


@pytest.mark.parametrize("question", ["Is the prognosis good?", "Describe the slide.", "Grade A) only"])
def test_a_question_without_a_run_of_options_has_none(question):
    assert split_options(question)[1] == {}


@pytest.mark.parametrize("answer,choice", [
    # the letter, as WSI-Bench-trained models answer
    ("C", "C"), ("C)", "C"), ("(C)", "C"), ("C.", "C"), ("c", "C"), ("**C**", "C"), (" C\n", "C"),
    ("C) Squamous cell carcinoma, non-keratinizing type", "C"),
    ("C. Squamous cell carcinoma, non-keratinizing type.", "C"),
    # an explicit statement
    ("The answer is C.", "C"), ("Answer: (B)", "B"), ("Option D", "D"), ("The correct option is B) Squamous", "B"),
    ("The correct answer to the question is (A) Adenocarcinoma. This is evident from the glands. Therefore, the best "
     "answer based on the image is (A).", "A"),
    ("I choose B) because keratin pearls are present.", "B"),
    # the option's text
    ("Squamous cell carcinoma, non-keratinizing type", "C"), ("small cell carcinoma.", "D"),
    ("The tumour is a squamous cell carcinoma, keratinizing type, not an adenocarcinoma.", "B"),
    ("non-keratinizing type", "C"),  # a distinctive part of one option
    ("Adenocarcinoma", "A"),
])
def test_the_choice_in_a_free_text_answer(answer, choice):
    assert extract_choice(answer, OPTIONS).choice == choice


@pytest.mark.parametrize("answer,why", [
    ("A tumour with glands and mucin.", "no option"),  # the article is not option A
    ("The answer is a squamous cell carcinoma.", "no option"),  # nor here (and the text fits two options)
    ("Squamous cell carcinoma", "ambiguous: B, C"),  # contained in two options
    ("A) Adenocarcinoma B) Squamous cell carcinoma, keratinizing type C) …", "ambiguous"),  # options echoed
    ("The answer could be B or C.", "ambiguous: B, C"),
    ("", "empty"),
    ("I cannot determine this from the image.", "no option"),
])
def test_unreadable_or_ambiguous_answers_choose_nothing(answer, why):
    found = extract_choice(answer, OPTIONS)
    assert found.choice is None and why in found.how


@pytest.mark.parametrize("answer,choice", [
    ("Yes", "Yes"), ("yes.", "Yes"), ("No", "No"), ("No, the prognosis is not good.", "No"),
    ("Yes, given the low stage.", "Yes"), ("The prognosis is good: yes.", "Yes"), ("True", "Yes"),
    ("The prognosis is poor.", None), ("Yes or no cannot be said; no.", "Yes"),  # the first word decides
])
def test_yes_no_answers(answer, choice):
    assert extract_choice(answer, YES_NO).choice == choice


def test_reference_answers():
    assert [letter_answer(x, OPTIONS) for x in ("C", "(B)", "D.", "A) Adenocarcinoma", "adenocarcinoma")] == \
        ["C", "B", "D", "A", "A"]
    assert letter_answer("A well differentiated tumour", OPTIONS) is None  # free text is not the letter A
    assert letter_answer("E", OPTIONS) is None
    assert [yes_no_answer(x) for x in ("Yes", "No.", "yes", "True", "Yes, poor", "Maybe")] == \
        ["Yes", "No", "Yes", "Yes", None, None]


SUBTYPES = ("With ER in most tumour nuclei, PR absent and HER2 scored (1+), which molecular subtype fits?  "
            "A) Luminal A   B) Luminal B   C) HER2-enriched   D) Basal-like")


def test_options_that_end_in_a_letter_are_not_markers_and_answers_naming_them_are_read():
    stem, options = split_options(SUBTYPES)
    assert stem.endswith("which molecular subtype fits?") and options == {
        "A": "Luminal A", "B": "Luminal B", "C": "HER2-enriched", "D": "Basal-like"}
    read = {answer: extract_choice(answer, options).choice
            for answer in ("Luminal A", "The molecular subtype is Luminal B.", "A) Luminal A", "C", "basal-like",
                           "HER2-enriched, not luminal B")}
    assert read == {"Luminal A": "A", "The molecular subtype is Luminal B.": "B", "A) Luminal A": "A", "C": "C",
                    "basal-like": "D", "HER2-enriched, not luminal B": "C"}
