import json
import math

import pytest
from PIL import Image

from chatexaonepath.eval.criteria import AcceptanceRule, EvalError
from chatexaonepath.eval.report import bootstrap_interval, compare_runs, summarize, write_comparison
from chatexaonepath.eval.run import judge_answers_file
from chatexaonepath.loopback import FakeOpenAIServer

from .judges import IDS, asked_ids, keyword_judge, verdict, write_answers


def test_bootstrap_interval_on_a_known_sample():
    low, high = bootstrap_interval(63, 100)
    half = 1.96 * math.sqrt(0.63 * 0.37 / 100)  # the normal approximation the bootstrap should match at n=100
    assert low == pytest.approx(0.63 - half, abs=0.015) and high == pytest.approx(0.63 + half, abs=0.015)
    assert bootstrap_interval(63, 100) == (low, high)  # seeded: the same run gives the same interval
    assert bootstrap_interval(20, 20) == (1.0, 1.0) and bootstrap_interval(0, 0) is None
    wide, narrow = bootstrap_interval(5, 10), bootstrap_interval(500, 1000)
    assert wide[1] - wide[0] > 3 * (narrow[1] - narrow[0])


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
    assert summary["per_organ"]["lung"] == {"n": 2, "n_judged": 1, "n_accepted": 0, "acceptance_rate": 0.0}
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
    assert "acceptance rate: 50.0%" in report and "| Diagnosis consistent (`diagnosis`) | major | 50.0%" in report
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
    assert markdown.splitlines()[0].endswith("| " + " | ".join(IDS) + " |")
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
