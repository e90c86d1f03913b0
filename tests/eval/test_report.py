import json
import pytest
from PIL import Image

from chatexaonepath.eval.criteria import AcceptanceRule, EvalError
from chatexaonepath.eval.compare import compare_runs, write_comparison
from chatexaonepath.eval.report import report_markdown, summarize
from chatexaonepath.eval.run import judge_answers_file
from chatexaonepath.loopback import FakeOpenAIServer

from .judges import IDS, asked_ids, keyword_judge, verdict, write_answers


def record(i, passes, accepted, **extra):
    return {"id": f"r{i}", "accepted": accepted, "criteria": {k: {"pass": v, "reason": ""} for k, v in passes.items()},
            "judge_error": None, "flags": [], **extra}


def test_summary_counts_breakdowns_and_agreement(criteria):
    ok = {i: True for i in criteria.ids}
    records = [
        record(0, ok, True, category="diagnosis", organ="breast"),
        record(1, {**ok, "diagnosis": False}, False, category="diagnosis", organ="lung"),
        record(2, {**ok, "clinical_language": False}, True, category="grade", organ="breast"),
        {**record(3, {i: None for i in criteria.ids}, None, organ="lung"), "judge_error": "unusable", "error_kind": "output"},
    ]
    records[0]["criteria"]["site"].update(agreement=2 / 3, votes=[True, True, False])
    records[0]["votes"] = 3
    summary = summarize(records, criteria, AcceptanceRule("major"), skipped=[{"id": "r9", "error": "no features"}])
    assert (summary["n"], summary["n_items"], summary["n_judged"], summary["n_accepted"]) == (4, 5, 3, 2)
    assert summary["acceptance_rate"] == pytest.approx(2 / 3) and summary["n_judge_errors"] == 1
    assert summary["criteria"]["diagnosis"] == {"name": "Diagnosis consistent", "severity": "major", "n": 3,
                                                "n_passed": 2, "pass_rate": pytest.approx(2 / 3), "n_errors": 1}
    assert summary["per_category"]["diagnosis"]["acceptance_rate"] == 0.5
    assert summary["per_organ"]["lung"] == {"n": 2, "n_judged": 1, "n_accepted": 0, "n_undecided": 1,
                                            "acceptance_rate": 0.0, "acceptance_ci95": None}
    assert summary["n_undecided"] == 1 and summary["kind"] == "judge"
    assert summary["judge_agreement"]["per_criterion"]["site"] == pytest.approx(2 / 3)
    assert summary["skipped"][0]["id"] == "r9"
    json.dumps(summary)  # summary.json must be plain JSON


def run_with(tmp_path, name, answers, reply, **kwargs):
    write_answers(tmp_path / f"{name}.jsonl", answers)
    with FakeOpenAIServer(reply=reply) as server:
        return judge_answers_file(tmp_path / f"{name}.jsonl", tmp_path / name, f"openai:test-model@{server.url}",
                                  **kwargs)


def test_run_folder_has_report_and_chart(tmp_path):
    result = run_with(tmp_path, "v1", ["Carcinoma.", "Benign."], keyword_judge)
    out = result.out_dir
    assert {p.name for p in out.iterdir()} >= {"verdicts.jsonl", "summary.json", "report.md", "criteria.png",
                                              "eval_config.json"}
    report = (out / "report.md").read_text()
    assert "acceptance rate (rule `major`): 50.0%" in report and "| Diagnosis consistent (`diagnosis`) | major | 50.0%" in report
    assert Image.open(out / "criteria.png").size[0] > 300
    config = json.loads((out / "eval_config.json").read_text())
    assert config["acceptance_rule"] == "major" and len(config["criteria"]["criteria"]) == 7
    assert config["judge"]["votes"] == 1 and config["judge"]["backend"].startswith("openai:test-model@")


def test_compare_two_runs_side_by_side(tmp_path):
    run_with(tmp_path, "v2", ["Carcinoma.", "Benign.", "Benign.", "Benign."], keyword_judge)
    run_with(tmp_path, "v3", ["Carcinoma.", "Carcinoma.", "Benign.", "Carcinoma."], keyword_judge)
    markdown, md, png = write_comparison([tmp_path / "v2", tmp_path / "v3"], tmp_path / "cmp")
    rows = {line.split("|")[1].strip(): line for line in markdown.splitlines() if line.startswith("| v")}
    assert "25.0%" in rows["v2"].split("|")[3] and "75.0%" in rows["v3"].split("|")[3]
    assert "| " + " | ".join(IDS) + " |" in markdown.splitlines()[0]
    assert md.read_text().startswith("# Run comparison") and Image.open(png).size[0] > 300
    assert "not on the same footing" not in markdown


def test_compare_warns_when_runs_are_not_on_the_same_footing(tmp_path):
    run_with(tmp_path, "a", ["Carcinoma."], keyword_judge)
    run_with(tmp_path, "b", ["Carcinoma."], lambda m: verdict(asked_ids(m)), rule="all")
    markdown, _, _ = compare_runs([tmp_path / "a", tmp_path / "b"])
    assert "different acceptance rules" in markdown


def test_compare_needs_finished_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="no summary.json"):
        compare_runs([tmp_path / "empty"])


def test_intervals_resample_slides_and_undecided_answers_have_their_own_column(criteria):
    ok = {i: True for i in criteria.ids}
    bad = {**ok, "diagnosis": False}
    # 12 slides × 4 questions, every slide's answers all accepted or all rejected; 4 undecided on top.
    records = [record(4 * s + q, ok if s % 3 else bad, bool(s % 3), slide=f"S{s}", category="diagnosis")
               for s in range(12) for q in range(4)]
    records += [{**record(100 + i, {c: None for c in criteria.ids}, None, slide="S0", category="diagnosis"),
                 "judge_error": "unusable", "error_kind": "output"} for i in range(4)]
    summary = summarize(records, criteria, AcceptanceRule("major"))
    assert (summary["n"], summary["n_judged"], summary["n_undecided"]) == (52, 48, 4)
    assert summary["bootstrap"]["n_slides"] == 12 and summary["bootstrap"]["method"].endswith("resampling slides")
    clustered = summary["acceptance_ci95"][1] - summary["acceptance_ci95"][0]
    wilson = summary["acceptance_ci95_wilson"][1] - summary["acceptance_ci95_wilson"][0]
    assert clustered > 1.5 * wilson  # 12 independent slides, not 48 independent answers
    assert summary["per_category"]["diagnosis"]["n_undecided"] == 4
    assert summary["acceptance_by_rule"]["all"]["n_judged"] == 48
    report = report_markdown({**summary, "name": "x"})
    assert "| model | 52 | 48 | 4 | 32 | 66.7%" in report
    lines = report.splitlines()
    headers = [lines[i - 1] for i, line in enumerate(lines) if line.startswith("|---")]
    assert len(headers) >= 4
    for header in headers:  # every table that shows acceptance names the rule it applied
        assert "accept" not in header.lower() or "rule" in header, header
    assert "Acceptance rule `major`: every major criterion must pass." in report


def test_acceptance_under_all_and_major_from_the_same_verdicts(criteria):
    ok = {i: True for i in criteria.ids}
    records = [record(0, ok, True), record(1, {**ok, "clinical_language": False}, True),
               record(2, {**ok, "site": False}, False)]
    by_rule = summarize(records, criteria, AcceptanceRule("major"))["acceptance_by_rule"]
    assert by_rule["major"]["n_accepted"] == 2 and by_rule["all"]["n_accepted"] == 1


def test_compare_shows_closed_runs_with_their_baselines(tmp_path):
    from chatexaonepath.eval.closed_report import summarize_closed, write_closed_outputs

    def scored(correct):
        return [{"id": f"q{i}", "answer": "A", "choice": "A", "how": "letter", "correct": c, "slide": f"S{i // 2}",
                 "file": "f.json", "category": "dx"} for i, c in enumerate(correct)]

    summary = summarize_closed({"model": scored([1, 1, 1, 0]), "blind": scored([1, 0, 0, 0])}, n_items=4, skipped=[],
                               not_closed=[], extra={"name": "c1", "data": ["f.json"]})
    assert summary["slide_dependence"]["overall"]["difference"] == 0.5
    (tmp_path / "c1").mkdir()
    write_closed_outputs(tmp_path / "c1", summary)
    run_with(tmp_path, "j1", ["Carcinoma."], keyword_judge)
    markdown, _, png = write_comparison([tmp_path / "j1", tmp_path / "c1"], tmp_path / "cmp")
    assert "| c1 | 4 | 75.0%" in markdown and "| 25.0%" in markdown and "+50.0 pp" in markdown
    assert "| j1 | 1 | 100.0%" in markdown and "`major`" in markdown and Image.open(png).size[0] > 300
