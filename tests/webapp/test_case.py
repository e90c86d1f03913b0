"""A case in the app's session (issue 31): slides added to one conversation, the case budgets checked before the
work starts, a region that belongs to one slide, evidence and warnings that name their slide, the example case."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pytest

from chatexaonepath.chat.regions import Region
from chatexaonepath.errors import BudgetExceededError, ChatEXAONEPathError
from chatexaonepath.webapp.case import example_case_slides, strip_html
from chatexaonepath.webapp.config import GB, AppConfig
from chatexaonepath.webapp.transcript import transcript_markdown
from chatexaonepath.webapp.viewer import chat_messages, page_case_region
from tests.webapp.conftest import gradio_upload


def case_of_two(session, slides, tmp_path):
    session.load_upload(gradio_upload(tmp_path, slides["tumor"]))
    session.set_adding(True)
    session.load_upload(gradio_upload(tmp_path, slides["stroma"]))
    return session


def test_adding_builds_a_case_and_a_plain_load_replaces_it(make_engine, slides, tmp_path):
    session = make_engine().session("tab")
    session.load_upload(gradio_upload(tmp_path, slides["tumor"]))
    session.ask("What is the diagnosis?")
    assert session.adding is False
    session.set_adding(True)
    view = session.load_upload(gradio_upload(tmp_path, slides["stroma"]))
    assert [s.name for s in session.case] == ["tumor.tiff", "stroma.tiff"] and len(session.chat.slides) == 2
    assert session.shown == 1 and session.view is view and view.name == "stroma"
    assert session.adding is False  # back to replacing after an add
    assert len(session.turns) == 2  # the conversation goes on
    assert all(s.status == "ready" and s.thumbnail.startswith("data:image/png") for s in session.case)
    kept = [s.path for s in session.case]
    assert all(path.exists() for path in kept)  # every slide of the case keeps its file (its viewer reads it)
    strip = strip_html(session.strip(), session.shown)
    assert strip.count('class="cxp-case-slide') == 2 and 'data-slide="1" data-status="ready" aria-pressed="true"' in strip
    session.show_slide(0)
    assert session.view.name == "tumor" and session.shown_slide is session.chat.slides[0]
    with pytest.raises(ChatEXAONEPathError, match="no slide 6"):
        session.show_slide(5)
    for odd in (True, -1, "1", 1.0, 10**5000, None):  # what a scripted client may send the strip's event
        with pytest.raises(ChatEXAONEPathError, match="^This case has 2 slide"):
            session.show_slide(odd)
    session.load_upload(gradio_upload(tmp_path, slides["normal_20x"]))  # not adding: a new case
    assert [s.name for s in session.case] == ["normal_20x.tiff"] and session.turns == []
    assert not any(path.exists() for path in kept)


def test_a_full_case_refuses_an_add_in_one_sentence_and_stores_nothing(make_engine, slides, tmp_path):
    session = case_of_two(make_engine(max_case_slides=2).session("tab"), slides, tmp_path)
    before = (list(session.case), list(session.chat.slides), sorted(session.folder.iterdir()))
    with pytest.raises(BudgetExceededError, match=r"already has 2 slides.*--max-case-slides") as refused:
        session.set_adding(True)
    assert str(refused.value).count(". ") == 0  # one sentence
    session.adding = True  # as a scripted client could leave it: the upload is refused before it is moved in
    with pytest.raises(BudgetExceededError, match="--max-case-slides"):
        session.claim_upload(gradio_upload(tmp_path, slides["normal_20x"]))
    assert (list(session.case), list(session.chat.slides), sorted(session.folder.iterdir())) == before


@pytest.mark.parametrize("cached", [False, True], ids=["extracted", "cached"])
def test_the_case_patch_budget_refuses_an_add_and_loses_nothing(make_engine, slides, tmp_path, cached):
    engine = make_engine()
    probe = engine.session("probe")
    probe.load(slides["tumor"])
    tumor_patches = probe.case_patches()
    if cached:
        probe.load(slides["stroma"])  # its features are cached: the grid's budget never runs, the total still counts
    engine.end_session("probe")
    engine.config.max_case_patches = tumor_patches + 1
    session = engine.session("tab")
    session.load(slides["tumor"])
    session.ask("What is the diagnosis?")
    before = (list(session.case), list(session.chat.slides), list(session.turns))
    session.set_adding(True)
    with pytest.raises(BudgetExceededError, match="--max-case-patches"):
        session.load(slides["stroma"])
    assert (list(session.case), list(session.chat.slides), list(session.turns)) == before
    assert session.pending_slide.status == "failed"  # the strip shows the refusal; the case is untouched
    assert "--max-case-patches" in session.pending_slide.message


def test_the_session_disk_budget_counts_every_slide_of_the_case(make_engine, slides, tmp_path):
    sizes = {name: slides[name].stat().st_size for name in ("tumor", "stroma", "normal_20x")}
    room = sizes["tumor"] + sizes["stroma"] + sizes["normal_20x"] // 2  # two slides fit, not a third
    session = make_engine(max_upload_gb=max(sizes.values()) * 1.01 / GB, max_session_gb=room / GB).session("tab")
    case_of_two(session, slides, tmp_path)
    session.set_adding(True)
    with pytest.raises(ChatEXAONEPathError, match="--max-session-gb"):
        session.load_upload(gradio_upload(tmp_path, slides["normal_20x"]))
    assert [s.name for s in session.case] == ["tumor.tiff", "stroma.tiff"] and len(session.chat.slides) == 2


def test_a_region_belongs_to_its_slide_and_evidence_names_its_slide(make_engine, slides, tmp_path):
    engine = make_engine()
    session = case_of_two(engine.session("tab"), slides, tmp_path)
    reply = session.ask("What is here?", region=Region(0, 0, 1024, 1024), slide=1)
    assert reply.slide == 1 and session.turns[-1].slide == 1 and session.turns[-1].region is not None
    whole = session.ask("Which slide shows the lesion?")
    assert whole.patches == len(session.chat.slides[0].features)
    messages = chat_messages(session, engine.tiles)
    assert "Slide 2, region" in messages[0]["content"] and "@2" in messages[0]["content"]
    assert "slide 2 ·" in messages[1]["content"]  # the region's evidence is on slide 2
    assert "@" in messages[3]["content"]  # the whole case's evidence: each chip names its slide
    saved = transcript_markdown(session, "stroma.tiff", {"mpp": 0.25, "width": 2048, "height": 2048})
    assert "Case of 2 slides: 1 tumor.tiff; 2 stroma.tiff" in saved and "Question about a region on slide 2" in saved
    assert "Question about the whole case" in saved and "| # | slide | centre |" in saved
    with pytest.raises(ChatEXAONEPathError, match="no slide 3"):
        session.ask("And here?", slide=2)


def test_typicality_warnings_are_said_per_slide(make_engine, slides, tmp_path):
    engine = make_engine()
    session = case_of_two(engine.session("tab"), slides, tmp_path)
    session.chat.slides[1].typicality = SimpleNamespace(warning="This slide is unlike the model's training slides.")
    session.ask("What is the diagnosis?")
    answer = chat_messages(session, engine.tiles)[1]["content"]
    assert "Slide 2 (stroma.tiff): This slide is unlike" in answer and "Slide 1 (" not in answer


@pytest.mark.parametrize("text, expected", [("1,2,3,4", (0, Region(1, 2, 3, 4))), ("2:1,2,3,4", (1, Region(1, 2, 3, 4))),
                                            (" 3 : 5,6,7,8", (2, Region(5, 6, 7, 8)))])
def test_the_region_box_names_its_slide(text, expected):
    assert page_case_region(text, 3) == expected


@pytest.mark.parametrize("text", ["4:1,2,3,4", "0:1,2,3,4", "x:1,2,3,4", "2:1,2,3", "99999999999:1,2,3,4"])
def test_a_region_of_no_slide_is_one_sentence(text):
    with pytest.raises(ChatEXAONEPathError):
        page_case_region(text, 3)


def test_the_case_budgets_are_checked_at_start():
    assert AppConfig().max_case_slides == 8
    for bad in (dict(max_case_slides=0), dict(max_case_slides=9), dict(max_case_patches=0)):
        with pytest.raises(ChatEXAONEPathError, match="--max-case"):
            AppConfig(**bad)


def test_the_example_case_is_the_first_organs_held_out_slides_by_id(tmp_path):
    cohort = tmp_path / "cohort"
    (cohort / "slides").mkdir(parents=True)
    rows = [("c-03", "colon", "test"), ("c-01", "colon", "train"), ("c-02", "colon", "test"), ("c-04", "colon", "test"),
            ("c-05", "colon", "test"), ("l-01", "liver", "test"), ("l-02", "liver", "test")]
    (cohort / "labels.csv").write_text("slide_id,organ,split\n" + "".join(f"{s},{o},{p}\n" for s, o, p in rows))
    for slide_id, _, _ in rows:
        (cohort / "slides" / f"{slide_id}.tiff").write_bytes(b"")
    demo = SimpleNamespace(folder=tmp_path, card={"organs": ["colon", "liver"]})
    assert [p.name for p in example_case_slides(demo)] == ["c-02.tiff", "c-03.tiff", "c-04.tiff"]
    demo.card["organs"] = ["kidney", "liver"]  # an organ without two held-out slides is passed over
    assert [p.name for p in example_case_slides(demo)] == ["l-01.tiff", "l-02.tiff"]
    (cohort / "labels.csv").unlink()
    with pytest.raises(ChatEXAONEPathError, match="no labels"):
        example_case_slides(demo)


def test_the_example_case_is_a_held_out_case_of_the_cohort_the_one_with_the_example_slide_first(tmp_path):
    cohort = tmp_path / "cohort"
    (cohort / "slides").mkdir(parents=True)
    (cohort / "labels.csv").write_text("slide_id,organ,split\n" + "".join(f"s-{i},colon,test\n" for i in range(6)))
    for i in range(6):
        (cohort / "slides" / f"s-{i}.tiff").write_bytes(b"")
    (cohort / "cases.csv").write_text(
        "case_id,organ,split,slides,lesion_slide,diagnosis\n"
        "case-0000,colon,train,s-0 s-1 s-2,1,melanoma\n"  # not held out
        "case-0001,colon,test,s-3 s-4 s-5,,none\n"  # no lesion to find
        "case-0002,colon,test,s-4 s-1,2,melanoma\n"
        "case-0003,colon,test,s-5 s-2 s-4,3,melanoma\n"
        "case-0004,colon,test,s-0 s-5,1,adenocarcinoma\n")
    demo = SimpleNamespace(folder=tmp_path, card={"organs": ["colon"], "example": {"slide": "s-0"}})
    assert [p.name for p in example_case_slides(demo)] == ["s-0.tiff", "s-5.tiff"]  # holds the example slide
    demo.card["example"]["slide"] = "s-9"
    assert [p.name for p in example_case_slides(demo)] == ["s-5.tiff", "s-2.tiff", "s-4.tiff"]  # the most slides
    assert [p.name for p in example_case_slides(demo, count=2)] == ["s-4.tiff", "s-1.tiff"]  # then by id


def test_the_strip_shows_a_slide_loading_and_one_that_failed(make_engine, slides, tmp_path):
    session = make_engine().session("tab")
    session.load(slides["tumor"])
    session.set_adding(True)
    seen = []
    session.load(slides["stroma"], on_progress=lambda progress: seen.append([s.status for s in session.strip()]))
    assert seen[0] == ["ready", "loading"] and session.strip()[-1].status == "ready"
    session.set_adding(True)
    with pytest.raises(ChatEXAONEPathError):
        session.load_upload(gradio_upload(tmp_path, slides["truncated"]))
    assert [s.status for s in session.strip()] == ["ready", "ready", "failed"]
    strip = strip_html(session.strip(), session.shown, session.adding)
    assert 'data-status="failed"' in strip and "truncated.svs" in strip and str(tmp_path) not in strip
    assert session.adding  # still adding: the next upload joins the case
    seen.clear()
    session.set_adding(False)
    session.load(slides["normal_20x"], on_progress=lambda progress: seen.append([s.name for s in session.strip()]))
    assert seen[0] == ["normal_20x.tiff"]  # a slide replacing the case is listed alone while it loads


def test_a_scripted_switch_to_no_slide_changes_nothing(make_engine, slides, tmp_path):
    from chatexaonepath.webapp.viewer_page import ViewerHandlers

    engine = make_engine()
    session = case_of_two(engine.session("tab"), slides, tmp_path)
    handlers = ViewerHandlers(engine)
    request = SimpleNamespace(session_hash="tab", username=None)
    for data in ([1], {"slide": 7}, {"slide": "0"}, {"slide": 0, "goto": "1e309,0,1,1"}, None):
        assert all(isinstance(out, type(gr.skip())) for out in
                   handlers.switch_slide(True, 0.3, request, SimpleNamespace(_data=data)))
    assert session.shown == 1
    config, strip, image, gallery = handlers.switch_slide(True, 0.3, request, SimpleNamespace(_data={"slide": 0}))
    assert config["name"] == "tumor.tiff" and config["slide"] == 0 and session.shown == 0
    assert 'data-slide="0" data-status="ready" aria-pressed="true"' in strip and len(gallery) == 8


def test_slides_of_other_sessions_join_a_case_for_one_answer_within_the_case_budgets(make_engine, slides, tmp_path,
                                                                                   monkeypatch):
    """The API's case: each file its own session, the first answering with the others' slides joined."""
    engine = make_engine(max_case_slides=2)
    first, second, third = (engine.session(name) for name in ("a", "b", "c"))
    for session, name in ((first, "tumor"), (second, "stroma"), (third, "normal_20x")):
        session.load_upload(gradio_upload(tmp_path, slides[name]))
    second.ask("What is it?")
    theirs = list(second.turns)

    reply = first.ask("Which slide shows tumour?", joined=[second.chat.slide], region=Region(0, 0, 1024, 1024),
                      slide=1)
    assert reply.slide == 1 and reply.region == Region(0, 0, 1024, 1024)
    assert all(e.slide == 1 and e.x < 1024 for e in reply.evidence)
    assert [s.name for s in first.chat.slides] == ["tumor.tiff"]  # joined for that answer only
    assert first.turns[-1].slide == 1 and second.turns == theirs  # the conversation is the first session's alone

    with pytest.raises(BudgetExceededError, match=r"^The case has 3 slides.*\(--max-case-slides\)\.$"):
        first.ask("And now?", joined=[second.chat.slide, third.chat.slide])
    patches = len(first.chat.slide.features) + len(second.chat.slide.features)
    monkeypatch.setattr(engine.config, "max_case_patches", patches - 1)
    with pytest.raises(BudgetExceededError, match=f"{patches:,} tissue patches.*--max-case-patches"):
        first.ask("And now?", joined=[second.chat.slide])
    with pytest.raises(ChatEXAONEPathError, match="no slide 3"):
        first.ask("And now?", slide=2)
    assert first.turns[-1].content != "And now?"  # refused before any work
