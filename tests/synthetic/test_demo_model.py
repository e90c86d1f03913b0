"""The cached demo model: built once per code and data version, found again without building, rebuilt
when its settings change; its card and the app's banner say exactly what it is. The builds here are
tiny (8 small slides, a 2-layer ViT and LLaMA, one epoch each): seconds, not the real ten minutes."""

from __future__ import annotations

import json
import re

import pytest

import chatexaonepath.synthetic.demo_model as demo_module
from chatexaonepath.synthetic.demo_model import (
    DEMO_DESCRIPTION, DemoBuildConfig, DemoModel, demo_key, ensure_demo_model, load_ready,
)
from chatexaonepath.synthetic.lesions import NO_LESION, read_lesion_labels
from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor
from tests.chat.conftest import make_tiny_llm


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    return make_tiny_llm(tmp_path_factory.mktemp("demo-llm"))


@pytest.fixture(scope="module")
def extractor(tiny_encoder):
    return FeatureExtractor(ExtractConfig(encoder=tiny_encoder.name, num_workers=0, batch_size=16), tiny_encoder)


def tiny_config(llm, **overrides) -> DemoBuildConfig:
    settings = dict(split_sizes=(1, 1, 1), cohort={"organs": ["colon", "liver"], "lesions": ["melanoma"]},
                    size=2048, llm=str(llm), phase1_epochs=1, phase2_epochs=1, batch_size=4,
                    phase1_max_patches=16, retries=0)  # of ~44 tissue patches a slide; 12 slides, 4 per split
    return DemoBuildConfig(**(settings | overrides))


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llm, extractor):
    root = tmp_path_factory.mktemp("demo-cache")
    stages = []
    demo = ensure_demo_model(tiny_config(tiny_llm), root=root, extractor=extractor,
                             progress=lambda stage, done, total: stages.append((stage, done, total)))
    return root, demo, stages


@pytest.mark.slow
def test_a_build_runs_every_stage_and_writes_its_card_last(built):
    root, demo, reports = built
    stages = [stage for stage, _, _ in reports]
    assert [s for i, s in enumerate(stages) if s not in stages[:i]] == ["cohort", "features", "phase 1", "phase 2",
                                                                       "validation", "check"]
    for stage in ("cohort", "features", "phase 1", "phase 2", "validation", "check"):  # every bar reaches its end
        done, total = [(d, t) for s, d, t in reports if s == stage and d is not None][-1]
        assert total and done == total, (stage, done, total)
    card = json.loads((demo.folder / "demo.json").read_text())
    assert card["what"] == DEMO_DESCRIPTION and card["encoder"] == "tiny-vit-test"
    assert card["train_slides"] == card["test_slides"] == 4 and card["patches"] > 0
    assert set(card["check"]["accuracy"]) == {"diagnosis", "organ", "grade", "margins", "description",
                                              "case_diagnosis", "which_slide"}
    questions = card["check"]["questions"]
    assert questions["diagnosis"]["asked"] == card["test_slides"]  # the whole test split, not a sample
    # the held-out cases (one per organ here: its melanoma slide beside its lesion-free one), next to the slides
    assert questions["which_slide"]["asked"] == questions["case_diagnosis"]["asked"] == card["check"]["held_out_cases"] == 2
    assert "2 held-out cases" in demo.describe() and "which slide " in demo.describe()
    for q in questions.values():  # what a collapse cannot hide: the interval and how many answers were distinct
        low, high = q["interval"]
        assert 0.0 <= low <= q["accuracy"] <= high <= 1.0 and 1 <= q["distinct_answers"] <= q["asked"]
    from chatexaonepath.vision_tower.features import read_attrs

    made = read_attrs(next((demo.folder / "features").glob("*.h5")))["precision"]
    assert card["precision"] == {"features": made, "training": runs_precision(demo)}
    # One seed, trained for one epoch: the validation check says why it failed, and the card marks it failed.
    assert card["validation"]["slides"] == 4 and card["attempts"][0]["seed"] == 0
    assert card["validation"]["passed"] == (not card["validation"]["reasons"]) and demo.failed != card["validation"]["passed"]
    assert (demo.model_dir / "config.json").is_file() and (demo.model_dir / "tower.safetensors").is_file()
    # Phase 1 trains on subsampled bags (the recipe's), phase 2 and everything served on whole slides.
    runs = {name: json.loads((demo.folder / name / "training_args.json").read_text()) for name in ("p1", "model")}
    assert [runs[name]["data"]["config"]["max_patches"] for name in ("p1", "model")] == [16, None]
    # Phase 2 trains on the training cases (two records each) and validates on the validation cases too.
    assert runs["model"]["data"]["case_records"] == 2 * 2 + 2 * 2 and runs["p1"]["data"]["case_records"] == 0


@pytest.mark.slow
def test_the_example_case_is_a_held_out_case_with_the_example_slide(built):
    from chatexaonepath.synthetic.lesions import read_lesion_cases
    from chatexaonepath.webapp.case import example_case_slides

    _, demo, _ = built
    slides = [p.stem for p in example_case_slides(demo)]
    case = next(c for c in read_lesion_cases(demo.folder / "cohort" / "cases.csv") if list(c.slide_ids) == slides)
    assert case.split == "test" and case.lesion_slide and demo.card["example"]["slide"] in slides


def runs_precision(demo) -> str:
    return json.loads((demo.model_dir / "training_args.json").read_text())["precision"]


@pytest.mark.slow
def test_the_example_is_the_largest_held_out_lesion_whatever_the_model_answers(built):
    _, demo, _ = built
    rows = read_lesion_labels(demo.folder / "cohort" / "labels.csv")
    row = rows[demo.card["example"]["slide"]]
    assert row["split"] == "test" and row["diagnosis"] != NO_LESION and demo.example_slide.is_file()
    assert demo.card["example"]["diagnosis"] == row["diagnosis"]
    lesions = sorted((-float(r["lesion_fraction"]), sid) for sid, r in rows.items()
                     if r["split"] == "test" and r["diagnosis"] != NO_LESION)
    assert demo.card["example"]["slide"] == lesions[0][1]


@pytest.mark.slow
def test_a_second_start_finds_the_build_without_building(built, tiny_llm, extractor, monkeypatch):
    root, demo, _ = built
    monkeypatch.setattr(demo_module, "build_demo_model", lambda *a, **k: pytest.fail("built again"))
    again = ensure_demo_model(tiny_config(tiny_llm), root=root, extractor=extractor)
    assert again.folder == demo.folder and again.card == demo.card


@pytest.mark.slow
def test_scoring_a_finished_build_again_keeps_its_card(built, tiny_llm, extractor, monkeypatch):
    # bench/learn_lesions.py --out <the cached demo build> resumes it without the check: the card the
    # app shows (its held-out figures and timings) must survive that, and other settings are refused.
    _, demo, _ = built
    card = (demo.folder / "demo.json").read_text()
    monkeypatch.setattr(demo_module, "_train", lambda *a, **k: pytest.fail("trained again"))
    again = demo_module.build_demo_model(demo.folder, tiny_config(tiny_llm, check=False), extractor=extractor)
    assert (demo.folder / "demo.json").read_text() == card and again.card["check"] == demo.card["check"]
    with pytest.raises(demo_module.ChatEXAONEPathError, match="other settings"):
        demo_module.build_demo_model(demo.folder, tiny_config(tiny_llm, phase1_epochs=3), extractor=extractor)


def test_the_start_up_line_gives_the_time_measured_for_this_kind_of_machine(monkeypatch):
    import torch

    import chatexaonepath.vision_tower.cpu_inference as cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpu, "oneDNN_bf16_available", lambda: True)
    assert "12 minutes" in demo_module.expected_build_time()
    monkeypatch.setattr(cpu, "oneDNN_bf16_available", lambda: False)
    assert "20 to 35 minutes" in demo_module.expected_build_time()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "GPU" in demo_module.expected_build_time()


def test_the_key_follows_settings_encoder_and_sources(tiny_llm, tiny_encoder, monkeypatch, tmp_path):
    config = tiny_config(tiny_llm)
    key = demo_key(config, tiny_encoder.weights_sha256)
    assert demo_key(tiny_config(tiny_llm), tiny_encoder.weights_sha256) == key
    assert demo_key(tiny_config(tiny_llm, phase2_epochs=2), tiny_encoder.weights_sha256) != key
    assert demo_key(config, "another-encoder") != key
    assert demo_key(config, tiny_encoder.weights_sha256, "bf16/bf16") != key  # a cache shared across CPUs
    here = demo_module.Path(demo_module.__file__).parent
    changed = tmp_path / "chatexaonepath" / "synthetic"
    for name in [*demo_module._SOURCES, *(f"../vision_tower/{n}" for n in demo_module._EXTRACTION_SOURCES)]:
        (changed / name).parent.mkdir(parents=True, exist_ok=True)  # a copy of the sources the key reads
        (changed / name).write_bytes((here / name).read_bytes())
    monkeypatch.setattr(demo_module, "__file__", str(changed / "demo_model.py"))
    assert demo_key(config, tiny_encoder.weights_sha256) == key
    for edited in ("lesions.py", "../vision_tower/tissue.py"):  # the cohort's drawing, or the tissue mask
        original = (changed / edited).read_bytes()
        (changed / edited).write_text("# changed\n", encoding="utf-8")
        assert demo_key(config, tiny_encoder.weights_sha256) != key, edited
        (changed / edited).write_bytes(original)


def test_an_unfinished_build_with_other_settings_or_a_foreign_folder_is_refused(tiny_llm, extractor, tmp_path,
                                                                                 monkeypatch):
    # Resuming either would take stages it finds (a phase 1 of other epochs, say) as this build's.
    monkeypatch.setattr(demo_module, "_make_cohort", lambda *a, **k: pytest.fail("built into it"))
    unfinished = tmp_path / "unfinished"
    (unfinished / "p1").mkdir(parents=True)
    (unfinished / "build.json").write_text(json.dumps(demo_module.asdict(tiny_config(tiny_llm, phase1_epochs=3))))
    with pytest.raises(demo_module.ChatEXAONEPathError, match="unfinished demo build with other settings"):
        demo_module.build_demo_model(unfinished, tiny_config(tiny_llm), extractor=extractor)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(demo_module.ChatEXAONEPathError, match="not empty and holds no demo build"):
        demo_module.build_demo_model(foreign, tiny_config(tiny_llm), extractor=extractor)
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1


@pytest.mark.slow
def test_an_unfinished_build_is_not_used_and_a_new_version_replaces_old_ones(tiny_llm, extractor, tmp_path):
    stale = tmp_path / "0123456789abcdef"
    (stale / "cohort").mkdir(parents=True)
    assert load_ready(stale) is None  # no demo.json: an interrupted build is never served
    rebuilt = ensure_demo_model(tiny_config(tiny_llm, check=False), root=tmp_path, extractor=extractor)
    assert rebuilt.card["check"] is None and rebuilt.example_slide.is_file()
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == [rebuilt.folder]  # the other version was removed


@pytest.fixture
def fake_demo(tmp_path):
    """A DemoModel as a finished build describes itself (its files are not needed by the app's card)."""
    card = {"organs": ["colon", "liver", "lymph node"], "lesions": ["adenocarcinoma", "squamous cell carcinoma",
            "melanoma"], "train_slides": 24, "example": {"slide": "les-0030"},
            "precision": {"features": "bf16", "training": "bf16"},
            "check": {"held_out_slides": 8, "accuracy": {"diagnosis": 0.875}, "localisation_auc": 0.93,
                      "questions": {"diagnosis": {"asked": 8, "correct": 7, "accuracy": 0.875, "interval": [0.53, 0.98],
                                                  "distinct_answers": 4, "top_share": 0.25}}}}
    return DemoModel(tmp_path / "demo", card)


def test_the_banner_and_model_card_say_what_it_is(fake_demo, extractor, tiny_llm, tmp_path):
    from chatexaonepath.chat.modeling import ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM
    from chatexaonepath.webapp.engine import AppConfig, AppEngine

    model = ChatEXAONEPathForCausalLM.build(ChatEXAONEPathConfig(llm_name_or_path=str(tiny_llm), tower_trained=True,
                                                                 aggregator={"in_dim": 64}))
    engine = AppEngine(model, extractor, AppConfig(features_dir=str(tmp_path / "f")), work_dir=tmp_path / "w",
                       demo=fake_demo)
    try:
        banner = engine.card.banner()
        assert "trained on synthetic slides; it knows only these synthetic organs (colon, liver, lymph node)" in banner
        assert "not a medical device" in banner and "melanoma" in banner
        from chatexaonepath.webapp.ui import banner_html

        visible = re.sub(r'title="[^"]*"', "", banner_html(engine))  # the tooltip repeats the whole text
        assert visible.lower().count("not a medical device") == 1  # the page says it once
        assert "cxp-banner-failed" not in banner_html(engine)
        tower = dict(engine.card.rows())["vision tower"]
        assert "the demo model" in tower and "AUC 0.93" in tower
        assert "diagnosis 7/8 (0.88, 95 % CI 0.53–0.98; 4 distinct answers)" in tower
        assert "features bf16, training bf16" in tower
        assert engine.example_path == fake_demo.folder / "cohort" / "slides" / "les-0030.tiff"
        assert engine.demo.questions()[0] == "What is the diagnosis?"
    finally:
        engine.close()


def test_the_app_serves_the_demo_without_a_model_and_not_with_untrained(monkeypatch, fake_demo):
    from chatexaonepath.chat import session as chat_session
    from chatexaonepath.errors import ChatEXAONEPathError
    from chatexaonepath.webapp.engine import AppConfig, AppEngine

    demo = fake_demo
    calls = []
    monkeypatch.setattr(demo_module, "ensure_demo_model", lambda config, **k: calls.append(f"demo {config.seed}") or demo)

    class Stop(Exception):
        pass

    def fake_load(checkpoint, llm):
        calls.append(checkpoint)
        raise Stop  # what follows is the ordinary model loading, tested elsewhere

    monkeypatch.setattr(chat_session, "load_chat_model", fake_load)
    with pytest.raises(Stop):
        AppEngine.load(AppConfig())
    assert calls == ["demo 0", str(demo.model_dir)]
    calls.clear()
    with pytest.raises(Stop):  # a red banner's way out: another first seed is another build
        AppEngine.load(AppConfig(demo_seed=3))
    assert calls == ["demo 3", str(demo.model_dir)]
    calls.clear()
    with pytest.raises(Stop):
        AppEngine.load(AppConfig(untrained=True))
    assert calls == [None]
    with pytest.raises(ChatEXAONEPathError, match="contradict"):
        AppConfig(untrained=True, model="runs/p2")


def test_a_failed_check_trains_the_next_seed_and_a_build_that_never_passes_is_served_in_red(tiny_llm, extractor,
                                                                                          tmp_path, monkeypatch):
    """Two failing seeds, then none: every retry says so on its progress line, and the card marks it failed."""
    trained, validated = [], []

    def fake_train(folder, run, config, phase, report, tag=""):
        trained.append((run.relative_to(folder).as_posix(), config.seed, phase))
        report(f"phase {phase}{tag}", 1, 1)
        out = run / ("p1" if phase == 1 else "model")
        out.mkdir(parents=True, exist_ok=True)
        (out / "training_args.json").write_text(json.dumps({"precision": "fp32"}))
        return {"steps": 1}

    def fake_validate(folder, run, config, report, tag=""):
        validated.append(tag)
        spread = {"diagnosis": {"asked": 4, "distinct_answers": 1, "top_share": 1.0}}
        reasons = demo_module.validation_verdict({"diagnosis": 0.25}, spread, config)
        return {"slides": 4, "accuracy": {"diagnosis": 0.25}, "answers": spread, "passed": not reasons,
                "reasons": reasons}

    monkeypatch.setattr(demo_module, "_train", fake_train)
    monkeypatch.setattr(demo_module, "_validate", fake_validate)
    stages = []
    demo = demo_module.build_demo_model(tmp_path / "b", tiny_config(tiny_llm, retries=2, check=False),
                                        extractor=extractor, progress=lambda s, d, t: stages.append(s))
    assert trained == [(".", 0, 1), (".", 0, 2), ("retry-1", 1, 1), ("retry-1", 1, 2), ("retry-2", 2, 1),
                       ("retry-2", 2, 2)]
    assert validated == ["", " · seed 1", " · seed 2"]
    assert "again with seed 1: the last seed failed the validation check" in demo_module.stage_text(
        next(s for s in stages if s.endswith("seed 1")))
    assert demo.failed and demo.model_dir == tmp_path / "b" / "retry-2" / "model"
    assert demo.card["validation"]["reasons"] == ["diagnosis accuracy 0.25 < 0.80",
                                                  "one answer to 100% of the diagnosis questions"]
    assert "3 seeds tried" in demo.failure() and "answers do not reflect the slide" in demo.failure()

    from chatexaonepath.chat.modeling import ChatEXAONEPathConfig, ChatEXAONEPathForCausalLM
    from chatexaonepath.webapp.engine import AppConfig, AppEngine
    from chatexaonepath.webapp.ui import banner_html

    model = ChatEXAONEPathForCausalLM.build(ChatEXAONEPathConfig(llm_name_or_path=str(tiny_llm), tower_trained=True,
                                                                 aggregator={"in_dim": 64}))
    engine = AppEngine(model, extractor, AppConfig(features_dir=str(tmp_path / "f")), work_dir=tmp_path / "w",
                       demo=demo)
    try:
        page = banner_html(engine)
        assert "cxp-banner-failed" in page and "answers do not reflect the slide" in page
    finally:
        engine.close()


def test_a_seed_that_passes_ends_the_retries(tiny_llm, extractor, tmp_path, monkeypatch):
    outcomes = iter([False, True])
    monkeypatch.setattr(demo_module, "_train", lambda folder, run, *a, **k: (run / "model").mkdir(parents=True, exist_ok=True) or {})
    monkeypatch.setattr(demo_module, "_validate", lambda *a, **k: {"passed": next(outcomes), "reasons": []})
    demo = demo_module.build_demo_model(tmp_path / "b", tiny_config(tiny_llm, retries=2, check=False),
                                        extractor=extractor)
    assert not demo.failed and demo.card["seed"] == 1 and len(demo.card["attempts"]) == 2
    assert demo.failure() is None and demo.model_dir == tmp_path / "b" / "retry-1" / "model"


def test_the_validation_rules():
    config = DemoBuildConfig()
    even = {"diagnosis": {"asked": 12, "distinct_answers": 4, "top_share": 0.25},
            "organ": {"asked": 12, "distinct_answers": 3, "top_share": 0.34}}
    assert demo_module.validation_verdict({"diagnosis": 0.8}, even, config) == []
    assert demo_module.validation_verdict({"diagnosis": 0.79}, even, config) == ["diagnosis accuracy 0.79 < 0.80"]
    collapsed = {**even, "organ": {"asked": 12, "distinct_answers": 2, "top_share": 10 / 12}}
    assert demo_module.validation_verdict({"diagnosis": 0.9}, collapsed, config) == [
        "one answer to 83% of the organ questions"]
    answers = [{"category": "organ", "answer": a} for a in ("Liver.", "liver. ", "Colon.")]
    assert demo_module.answer_spread(answers) == {"organ": {"asked": 3, "distinct_answers": 2, "top_share": 2 / 3}}


@pytest.mark.slow
def test_the_benchmark_scores_the_held_out_cases_beside_their_controls_and_baselines(built):
    import importlib.util

    from chatexaonepath.chat.modeling import ChatEXAONEPathForCausalLM
    from chatexaonepath.synthetic import baselines as B

    spec = importlib.util.spec_from_file_location("learn_lesions", demo_module.Path(__file__).parents[2] / "bench" /
                                                  "learn_lesions.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    _, demo, _ = built
    cohort, features = demo.folder / "cohort", demo.folder / "features"
    views = B.load_split_views(cohort, features)
    abmil = B.abmil_baseline(views, seed=0, epochs=2)
    model = ChatEXAONEPathForCausalLM.from_pretrained(demo.model_dir)
    figures = bench.case_figures(model, cohort, features, views, abmil, seed=0)
    assert figures["cases"] == 2 and len(figures["model_answers"]) == 4
    for line in ("model", "shuffled", "mean_pooled", "abmil"):
        assert {q: figures[line][q]["total"] for q in ("case_diagnosis", "which_slide")} == {
            "case_diagnosis": 2, "which_slide": 2}, line
    assert all(figures["colour"][q][1]["total"] == 2 and " / " in figures["colour"][q][0] for q in figures["colour"])
    rows = dict(bench.case_rows(figures))
    assert rows["test cases"] == "2" and any(key.startswith("which_slide: model") for key in rows)


@pytest.mark.slow
def test_a_resumed_build_counts_the_patches_extracted_before(built, extractor):
    """A build resumed after its features were made (Ctrl-C in phase 2, say) finds every slide extracted already:
    its card must still count their patches, not 0."""
    from chatexaonepath.synthetic import demo_model as demo_module

    _, demo, _ = built
    assert demo_module._extract(demo.folder, extractor, lambda *a: None) == demo.card["patches"] > 0
