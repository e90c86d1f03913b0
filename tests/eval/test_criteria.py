import pytest

from chatexaonepath.eval.criteria import AcceptanceRule, EvalError, load_criteria


def test_default_criteria_are_the_seven_with_one_minor(criteria):
    assert criteria.ids == ["diagnosis", "site", "histology", "no_contradiction", "no_fabrication",
                            "answers_question", "clinical_language"]
    assert [c.severity for c in criteria.criteria].count("minor") == 1
    assert criteria["clinical_language"].severity == "minor"
    assert criteria.precheck_criterion == "answers_question"
    assert all(len(c.definition) > 40 for c in criteria.criteria)


def test_user_criteria_file_is_loaded_and_fingerprinted(tmp_path, criteria):
    path = tmp_path / "mine.yaml"
    path.write_text("criteria:\n  - id: dx\n    definition: The diagnosis agrees with the report.\n"
                    "  - id: style\n    name: Style\n    definition: Clinical wording.\n    severity: minor\n")
    mine = load_criteria(path)
    assert mine.ids == ["dx", "style"] and mine["dx"].name == "dx" and mine.precheck_criterion is None
    assert mine.fingerprint() != criteria.fingerprint()


@pytest.mark.parametrize("text,expected", [
    ("criteria: []", "non-empty 'criteria'"),
    ("criteria:\n  - id: a\n", "'definition'"),
    ("criteria:\n  - {id: a, definition: x, severity: fatal}", "severity 'fatal'"),
    ("criteria:\n  - {id: a, definition: x}\n  - {id: a, definition: y}", "more than once"),
    ("criteria:\n  - {id: 'a b', definition: x}", "letters, digits"),
    ("precheck_criterion: zz\ncriteria:\n  - {id: a, definition: x}", "precheck_criterion 'zz'"),
    ("criteria: [unclosed", "not valid YAML"),
])
def test_malformed_criteria_files_are_one_sentence(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(EvalError, match=expected) as info:
        load_criteria(path)
    assert "\n" not in str(info.value)


def test_acceptance_rule_variants(criteria):
    all_pass = {i: True for i in criteria.ids}
    minor_fail = {**all_pass, "clinical_language": False}
    major_fail = {**all_pass, "diagnosis": False}
    two_fail = {**major_fail, "site": False}
    major, every, six = (AcceptanceRule.parse(r, criteria) for r in ("major", "all", "at-least:6"))
    assert major.decide(all_pass, criteria) and every.decide(all_pass, criteria)
    assert major.decide(minor_fail, criteria) is True and every.decide(minor_fail, criteria) is False
    assert major.decide(major_fail, criteria) is False
    assert six.decide(major_fail, criteria) is True and six.decide(two_fail, criteria) is False
    assert str(six) == "at-least:6" and AcceptanceRule.parse(" MAJOR ") == major


def test_unknown_verdicts_leave_acceptance_undecided(criteria):
    unknown_major = {**{i: True for i in criteria.ids}, "site": None}
    unknown_minor = {**{i: True for i in criteria.ids}, "clinical_language": None}
    assert AcceptanceRule("major").decide(unknown_major, criteria) is None
    assert AcceptanceRule("all").decide(unknown_minor, criteria) is None
    # The major rule never reads the minor criterion, so its missing verdict changes nothing.
    assert AcceptanceRule("major").decide(unknown_minor, criteria) is True


@pytest.mark.parametrize("text", ["most", "at-least:0", "at-least:x", "at-least:8"])
def test_bad_acceptance_rules_are_rejected(text, criteria):
    with pytest.raises(EvalError, match="at-least|rule"):
        AcceptanceRule.parse(text, criteria)


def test_acceptance_is_decided_as_soon_as_the_rule_is_met_or_cannot_be(criteria):
    six_and_unknown = {**{i: True for i in criteria.ids}, "clinical_language": None}
    two_fails_and_unknown = {**six_and_unknown, "diagnosis": False, "site": False}
    one_fail_and_unknown = {**six_and_unknown, "diagnosis": False}
    six = AcceptanceRule.parse("at-least:6", criteria)
    assert six.decide(six_and_unknown, criteria) is True  # six passes: the seventh cannot change that
    assert six.decide(two_fails_and_unknown, criteria) is False  # four passes + one unknown < 6
    assert six.decide(one_fail_and_unknown, criteria) is None  # five passes: the unknown decides
    # A known fail already rejects under `all` and `major`, whatever the unknown verdict would be.
    fail_and_unknown = {**{i: True for i in criteria.ids}, "diagnosis": False, "site": None}
    assert AcceptanceRule("all").decide(fail_and_unknown, criteria) is False
    assert AcceptanceRule("major").decide(fail_and_unknown, criteria) is False
