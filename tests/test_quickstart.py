"""The quickstart's stages wired end to end (tiny LLM, loopback LLM server), and its resume."""

import json
from pathlib import Path

import pytest

from chatexaonepath.loopback import FakeOpenAIServer
from chatexaonepath.quickstart import Quickstart, QuickstartConfig
from tests.eval.judges import asked_ids, verdict


def reply(messages):
    """RAIDER answers from the first excerpt's words; judge prompts get a well-formed verdict."""
    if "Judge the candidate answer on" in messages[-1]["content"]:
        return verdict(asked_ids(messages))
    if "[1] " in messages[1]["content"]:
        first = messages[1]["content"].split("[1] ", 1)[1]
        return " ".join(w for w in first.split()[:6] if not any(c.isdigit() for c in w))
    return "not mentioned in the report"


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_a_rerun_resumes(tmp_path, tiny_encoder, monkeypatch):
    import chatexaonepath.vision_tower.encoder as encoder_module
    from tests.chat.conftest import make_tiny_llm

    # The stages' wiring is under test, not ViT-B/16 (its features are 40 % of this test on 2 fp32 cores).
    monkeypatch.setitem(encoder_module._ENCODERS, tiny_encoder.name, lambda weights=None, seed=0: tiny_encoder)
    llm = make_tiny_llm(tmp_path / "llm")
    with FakeOpenAIServer(reply=reply) as server:
        backend = f"openai:test-model@{server.url}"
        # 8 slides as before: one organ, one lesion type and none; 1 train, 1 validation, 2 test per combination.
        config = QuickstartConfig(split_sizes=(1, 1, 2), cohort={"organs": ["colon"], "lesions": ["adenocarcinoma"]},
                                  size=2048, encoder=tiny_encoder.name, llm=str(llm), raider_llm=backend,
                                  judge=backend, phase1_epochs=1, phase2_epochs=1, judge_items=2)
        stages = []
        results = Quickstart(tmp_path / "qs", config,
                             lambda stage, done, total: stages.append((stage, done, total))).run()
        requests = len(server.requests)
        assert list(results) == ["cohort", "features", "raider", "phase 1", "phase 2", "evaluation"]
        assert ("evaluation", 4, 4) in stages  # the held-out scoring's bar advances to its end
        assert results["raider"]["instruction_records"] > 0
        assert results["raider"]["caption_records"] == 0  # phase 1 trains on the cohort's captions: none asked
        assert results["phase 2"]["steps"] > 0
        assert results["evaluation"]["held_out_slides"] == 4 and results["evaluation"]["judged"] == 2
        for figure in ("diagnosis_accuracy", "organ_accuracy", "grade_accuracy", "localisation_auc"):
            assert 0.0 <= results["evaluation"][figure] <= 1.0
        assert results["evaluation"]["judge_errors"] == 0
        assert 0.0 <= results["evaluation"]["acceptance_rate"] <= 1.0
        instructions = json.loads((tmp_path / "qs" / "raider" / "instructions.json").read_text())
        held_out = {Path(i).stem for r in json.loads((tmp_path / "qs" / "cohort" / "test.json").read_text())
                    for i in (r["image"] if isinstance(r["image"], list) else [r["image"]])}  # a case lists its slides
        assert not held_out & {r["image"] for r in instructions}  # no test report leaks into training
        saved = json.loads((tmp_path / "qs" / "quickstart.json").read_text())
        assert saved["stages"]["evaluation"]["judged"] == 2
        assert (tmp_path / "qs" / "model" / "config.json").is_file()

        # Everything is there: nothing is redone; without a judge the stage says so in one line, asking nothing.
        again = Quickstart(tmp_path / "qs", QuickstartConfig(**{**config.__dict__, "judge": None})).run()
        assert again["phase 1"] == {"skipped": "already trained", "seconds": again["phase 1"]["seconds"]}
        assert again["phase 2"]["skipped"] == "already trained"
        assert again["evaluation"]["judge"].startswith("skipped") and "--judge" in again["evaluation"]["judge"]
        assert len(server.requests) == requests  # RAIDER and the judge asked nothing twice

        # The phase-2 data changed (here one question fewer): the model trained on the old data is not served.
        import chatexaonepath.synthetic.lesions as lesions

        drawn = lesions.lesion_records
        monkeypatch.setattr(lesions, "lesion_records",
                            lambda slides: {k: v[:-1] if k == "instruct.json" else v for k, v in drawn(slides).items()})
        changed = Quickstart(tmp_path / "qs", QuickstartConfig(**{**config.__dict__, "judge": None})).run()
        assert changed["phase 1"]["skipped"] == "already trained"  # its captions are the same
        assert changed["phase 2"]["steps"] > 0
