"""The /v1 API (webapp/api/): the official `openai` client, the page's own server, every refusal in OpenAI's shape.

One tiny engine serves the module (2-layer LLaMA and ViT, the 2048² synthetic slides); each upload is
read by the page's own loading code, so the slides here take a second or two each.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager

import httpx
import pytest

from chatexaonepath.webapp.api import ApiKeys, ApiServer
from chatexaonepath.webapp.api.keys import ApiOwner

KEY = "k" * 24 + "-alpha"
OTHER_KEY = "o" * 24 + "-beta"


@pytest.fixture(scope="module")
def engine(tiny_chat_model, tiny_encoder, tmp_path_factory):
    from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor
    from chatexaonepath.webapp.engine import AppConfig, AppEngine

    root = tmp_path_factory.mktemp("api")
    extract = ExtractConfig(encoder=tiny_encoder.name, num_workers=0, batch_size=4)
    engine = AppEngine(tiny_chat_model, FeatureExtractor(extract, tiny_encoder),
                       AppConfig(features_dir=str(root / "features"), max_new_tokens=12, example=False,
                                 max_upload_gb=0.05, max_session_gb=0.1, api_max_files_per_key=3,
                                 api_max_conversation_chars=3_000, api_max_messages=8, max_case_slides=2),
                       example_path=root / "example.tiff", work_dir=root / "work")
    yield engine
    engine.close()


@contextmanager
def headless(engine, keys=None):
    server = ApiServer(engine, keys, port=0)
    url = server.start()
    try:
        yield url + "/v1"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api(engine, tmp_path_factory):
    """The API alone (as `chatexaonepath serve` runs it) with two keys (alpha, beta): its base URL."""
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"{KEY} alpha\n{OTHER_KEY} beta\n")
    with headless(engine, ApiKeys.load(key_file)) as url:
        yield url


def client(url, key=KEY):
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def upload(http, path, name=None, **fields):
    with open(path, "rb") as f:
        return http.post("/files", files={"file": (name or path.name, f)}, data={"purpose": "user_data", **fields})


def wait_processed(http, file_id, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = http.get(f"/files/{file_id}").json()
        if body["status"] != "uploaded":
            return body
        time.sleep(0.1)
    raise AssertionError(f"{file_id} still processing: {body}")


def ask(file_id, text="Describe the slide.", **extra):
    return {"model": "chatexaonepath-untrained", "messages": [
        {"role": "user", "content": [{"type": "file", "file": {"file_id": file_id}}, {"type": "text", "text": text}]}],
        **extra}


def error_of(response, status, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"].endswith(".")
    assert "/tmp" not in error["message"] and "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def processed_file(api, path) -> str:
    """`path` uploaded and waited for until processed: its file id."""
    http = client(api)
    body = upload(http, path).json()
    assert wait_processed(http, body["id"])["status"] == "processed"
    return body["id"]


@pytest.fixture(scope="module")
def tumor_file(api, slides):
    """The tumor slide uploaded and processed once for the module: its file id."""
    return processed_file(api, slides["tumor"])


def test_the_official_client_uploads_a_slide_waits_for_it_and_streams_an_answer(api, engine, slides):
    from openai import OpenAI

    openai = OpenAI(base_url=api, api_key=KEY, max_retries=0)
    with open(slides["tumor"], "rb") as f:
        created = openai.files.create(file=f, purpose="user_data")
    assert created.id.startswith("file-") and created.filename == "tumor.tiff" and created.status == "uploaded"
    assert created.bytes == slides["tumor"].stat().st_size
    ready = openai.files.wait_for_processing(created.id, poll_interval=0.2, max_wait_seconds=120)
    assert ready.status == "processed" and ready.model_extra["stage"] == "ready"
    assert ready.model_extra["slide"]["patches"] > 4

    question = "What is the most likely diagnosis?"
    stream = openai.chat.completions.create(
        model=openai.models.list().data[0].id, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "file", "file": {"file_id": created.id}},
                                               {"type": "text", "text": question}]}])
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2  # chunk by chunk, not one block at the end
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][0]
    assert final.choices[0].finish_reason in ("stop", "length")
    evidence = final.model_extra["evidence"]
    assert evidence["file_id"] == created.id and evidence["slide"] == "tumor.tiff" and evidence["region"] is None
    assert len(evidence["patches"]) == 3 and evidence["patches"][0]["weight"] >= evidence["patches"][1]["weight"]
    usage = chunks[-1].usage
    assert usage.completion_tokens == 12 and usage.prompt_tokens > engine.model.config.num_visual_tokens

    # The same answer the page's session gives on the same slide (greedy): the API adds nothing of its own.
    direct = engine.session("direct-check")
    direct.load(slides["tumor"])
    assert "".join(pieces).strip() == direct.ask(question).text
    engine.end_session("direct-check")

    whole = openai.chat.completions.create(
        model="chatexaonepath-untrained",
        messages=[{"role": "user", "content": [{"type": "file", "file": {"file_id": created.id}},
                                               {"type": "text", "text": question}]}])
    assert whole.choices[0].message.content == "".join(pieces).strip()
    assert whole.usage.total_tokens == usage.total_tokens and whole.model_extra["evidence"] == evidence
    assert openai.files.delete(created.id).deleted
    assert created.id not in [f.id for f in openai.files.list()]


def test_a_region_question_sees_that_regions_patches_and_a_stop_sequence_ends_the_answer(api, tumor_file):
    http = client(api)
    region = [0, 0, 1024, 1024]
    body = {"model": "chatexaonepath-untrained", "messages": [{"role": "user", "content": [
        {"type": "slide", "slide": {"file_id": tumor_file, "region": region}}, {"type": "text", "text": "And here?"}]}]}
    answer = http.post("/chat/completions", json=body).json()
    evidence = answer["evidence"]
    assert evidence["region"] == region and 0 < evidence["patches_in_scope"] < http.get(
        f"/files/{tumor_file}").json()["slide"]["patches"]
    assert all(p["x"] < 1024 and p["y"] < 1024 for p in evidence["patches"])

    full = http.post("/chat/completions", json=ask(tumor_file, max_tokens=12)).json()["choices"][0]["message"]["content"]
    words = full.split()
    assert len(words) >= 3
    cut = http.post("/chat/completions", json=ask(tumor_file, stop=[words[2]])).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["message"]["content"] == full[:full.index(words[2])].strip()
    assert cut["usage"]["completion_tokens"] < 12


def test_a_conversation_is_sent_whole_each_time_and_answered_from_it(api, tumor_file, engine):
    http = client(api)
    first = http.post("/chat/completions", json=ask(tumor_file, "What organ?")).json()["choices"][0]["message"]
    follow = ask(tumor_file, "What organ?")
    follow["messages"] += [first, {"role": "user", "content": "And the grade?"}]
    follow["messages"].insert(0, {"role": "system", "content": "Answer briefly."})
    reply = http.post("/chat/completions", json=follow)
    assert reply.status_code == 200, reply.text
    turns = engine.find_session(tumor_file, ApiOwner("alpha")).turns  # the session holds exactly this conversation
    assert [t.content for t in turns[:3]] == ["What organ?", first["content"], "And the grade?"]


def test_every_refusal_is_one_sentence_in_openais_shape(api, tumor_file, slides, tmp_path):
    http = client(api)
    error_of(http.get("/files/file-doesnotexist"), 404, "file_not_found")
    error_of(http.post("/chat/completions", json=ask("file-doesnotexist")), 404, "file_not_found")
    error_of(http.post("/chat/completions", json=ask(tumor_file, model="gpt-4o")), 404, "model_not_found")
    bad = ask(tumor_file)
    bad["messages"][0]["content"][0] = {"type": "slide", "slide": {"file_id": tumor_file, "region": [0, 0, "x", 5]}}
    error_of(http.post("/chat/completions", json=bad), 400, "invalid_region")
    bad["messages"][0]["content"][0]["slide"]["region"] = [10**6, 10**6, 100, 100]  # outside the slide
    error_of(http.post("/chat/completions", json=bad), 400, "invalid_region")
    picture = ask(tumor_file)
    picture["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}})
    error_of(http.post("/chat/completions", json=picture), 400, "unsupported_content")
    long = ask(tumor_file, "x" * 1000)
    long["messages"] += [{"role": "assistant", "content": "y" * 1500}, {"role": "user", "content": "z" * 600}]
    error_of(http.post("/chat/completions", json=long), 400, "context_length_exceeded")  # --api-max-conversation-chars
    many = ask(tumor_file)
    many["messages"] += [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}] * 4
    error_of(http.post("/chat/completions", json=many), 400, "context_length_exceeded")  # --api-max-messages
    error_of(http.post("/chat/completions", json=ask(tumor_file, top_p=0.5)), 400, "unsupported_parameter")
    error_of(http.post("/chat/completions", json=ask(tumor_file, logit_bias={"1": 5})), 400, "unsupported_parameter")
    assert http.post("/chat/completions", json=ask(tumor_file, top_p=1, n=1, user="me")).status_code == 200
    for field, value in (("max_tokens", 5000), ("max_tokens", 1e309), ("temperature", 3), ("temperature", "hot"),
                         ("seed", -1), ("stop", ["a"] * 5), ("stream", "yes")):
        error_of(http.post("/chat/completions", content=json.dumps(ask(tumor_file, **{field: value}))), 400)
    error_of(http.post("/chat/completions", json={"model": "chatexaonepath-untrained",
                                                  "messages": [{"role": "user", "content": "No slide?"}]}),
             400, "missing_slide")
    error_of(http.post("/chat/completions", json={"model": "x", "messages": [{"role": "tool", "content": "x"}]}),
             400, "unsupported_role")
    error_of(http.post("/chat/completions", content=b"{not json"), 400, "invalid_json")
    error_of(http.post("/chat/completions", content=b"[" * 100_000), 400, "invalid_json")
    error_of(http.post("/chat/completions", content=b" " * (2 << 20)), 413, "too_large")
    error_of(http.get("/nothing/here"), 404, "unknown_route")
    error_of(http.put("/files"), 405)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a slide")
    error_of(upload(http, notes), 400, "unsupported_file")
    error_of(http.post("/files", content=b"x" * 100, headers={"content-type": "application/octet-stream"}), 400)
    big = tmp_path / "huge.tiff"
    big.write_bytes(b"\0" * (60 << 20))  # past --max-upload-gb (0.05)
    error_of(upload(http, big), 413, "too_large")
    assert not list((http.get("/files").json()["data"])[1:])  # only the module's slide: nothing refused was kept


def test_a_slide_still_processing_is_said_so_and_a_slide_without_mpp_asks_for_it(api, engine, slides):
    http = client(api)
    with engine.model_slot():  # the model is busy: the load waits its turn
        body = upload(http, slides["stroma"]).json()
        time.sleep(0.5)
        waiting = http.get(f"/files/{body['id']}").json()
        assert waiting["status"] == "uploaded" and waiting["stage"] in ("queued", "reading", "waiting")
        error = error_of(http.post("/chat/completions", json=ask(body["id"])), 409, "file_not_ready")
        assert "still being processed" in error["message"]
    assert wait_processed(http, body["id"])["status"] == "processed"
    http.delete(f"/files/{body['id']}")

    no_mpp = upload(http, slides["no_mpp"]).json()
    failed = wait_processed(http, no_mpp["id"])
    assert failed["status"] == "error" and "form field mpp" in failed["status_details"]
    error_of(http.post("/chat/completions", json=ask(no_mpp["id"])), 400, "file_failed")
    error_of(upload(http, slides["no_mpp"], mpp="1e309"), 400, "invalid_mpp")
    from openai import OpenAI

    with open(slides["no_mpp"], "rb") as f:  # as docs/api.md says: the SDK's extra_body becomes a form field
        again = OpenAI(base_url=api, api_key=KEY).files.create(file=f, purpose="user_data",
                                                               extra_body={"mpp": 0.25}).to_dict()
    assert wait_processed(http, again["id"])["status"] == "processed"
    http.delete(f"/files/{again['id']}")
    http.delete(f"/files/{no_mpp['id']}")


def test_zips_are_read_as_from_the_page_and_seeds_make_sampling_repeatable(api, engine, slides, tumor_file, tmp_path):
    import zipfile

    http = client(api)
    archive = tmp_path / "case.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(slides["tumor"], "case/tumor.tiff")
    zipped = upload(http, archive).json()
    assert wait_processed(http, zipped["id"])["status"] == "processed"
    http.delete(f"/files/{zipped['id']}")
    two = tmp_path / "two.zip"
    with zipfile.ZipFile(two, "w") as zf:
        zf.write(slides["tumor"], "a.tiff")
        zf.write(slides["stroma"], "b.tiff")
    failed = wait_processed(http, upload(http, two).json()["id"])
    assert failed["status"] == "error" and "holds 2 slides" in failed["status_details"]  # the page's own sentence
    assert not list((engine.work_dir / "api-uploads").iterdir())  # nothing of either upload is left there
    error_of(http.post("/files", content=b"--b\r\nnot a form",
                       headers={"content-type": "multipart/form-data; boundary=b"}), 400)

    sampled = [http.post("/chat/completions", json=ask(tumor_file, temperature=1.5, seed=seed, max_tokens=8)).json()
               for seed in (7, 7, 8)]
    texts = [answer["choices"][0]["message"]["content"] for answer in sampled]
    assert texts[0] == texts[1] != texts[2]
    assert all(answer["usage"]["completion_tokens"] == 8 and answer["choices"][0]["finish_reason"] == "length"
               for answer in sampled)


def test_the_pages_own_server_serves_the_api_beside_the_unchanged_page(engine, slides):
    """`make demo`'s server: /v1 on the same port, same engine; without a key file, for this machine only."""
    from starlette.testclient import TestClient

    from chatexaonepath.webapp.cli import launch_app

    demo, url = launch_app(engine, host="127.0.0.1", port=None, quiet=True)
    try:
        page = httpx.get(url)
        assert page.status_code == 200 and "<html" in page.text.lower()
        models = httpx.get(url.rstrip("/") + "/v1/models").json()  # loopback: no key needed
        card = models["data"][0]["card"]
        assert models["data"][0]["id"] == "chatexaonepath-untrained"
        assert card["demo"] and card["warning"].startswith("Demo weights") and "untrained" in card["trained_on"]
        http = httpx.Client(base_url=url.rstrip("/") + "/v1", timeout=60)
        sessions = engine.session_count
        file_id = upload(http, slides["stroma"]).json()["id"]
        assert engine.session_count == sessions + 1  # a file is a session of the page's engine
        assert wait_processed(http, file_id)["status"] == "processed"
        stream = http.post("/chat/completions", json=ask(file_id, stream=True))
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.text.rstrip().endswith("data: [DONE]")
        # The page's upload route still wants a page session: the API's files do not open it.
        refused = httpx.post(url.rstrip("/") + "/gradio_api/upload", files={"files": ("a.png", b"x")})
        assert refused.status_code == 403
        http.delete(f"/files/{file_id}")
    finally:
        demo.close()
    # With the page behind a login, the API still takes its own keys only (the page's login is no key).
    demo, url = launch_app(engine, host="127.0.0.1", port=None, quiet=True, auth=[("ana", "a password")])
    try:
        assert httpx.get(url.rstrip("/") + "/v1/models").status_code == 200  # this machine, no key file
        assert httpx.get(url.rstrip("/") + "/gradio_api/info").status_code in (401, 403)  # the page needs its login
    finally:
        demo.close()
    # A client on another machine, without a key file on the server: refused.
    from chatexaonepath.webapp.api import build_api

    remote = TestClient(build_api(engine), client=("192.0.2.7", 5000))
    error_of(remote.get("/models"), 403, "loopback_only")
    local = TestClient(build_api(engine), client=("127.0.0.1", 5000))
    assert local.get("/models", headers={"Authorization": "Bearer anything"}).status_code == 200


def test_a_client_that_goes_away_stops_its_answer(api, tumor_file, engine):
    http = client(api)
    started = time.perf_counter()
    whole = http.post("/chat/completions", json=ask(tumor_file, max_tokens=400)).json()
    full_seconds = time.perf_counter() - started
    assert whole["usage"]["completion_tokens"] == 400
    with http.stream("POST", "/chat/completions", json=ask(tumor_file, stream=True, max_tokens=400)) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                hung_up = time.perf_counter()
                break  # one chunk, then hang up
    while engine.gate.active and time.perf_counter() - hung_up < full_seconds:
        time.sleep(0.01)
    freed = time.perf_counter() - hung_up
    assert engine.gate.active == 0 and freed < full_seconds / 4, (freed, full_seconds)  # not the 400 tokens


# -- a case: several slides of one patient in one conversation (issue 31) ----------------------------------------
@pytest.fixture(scope="module")
def stroma_file(api, slides):
    """The stroma slide uploaded and processed once for the module: with the tumor slide, a case of two."""
    return processed_file(api, slides["stroma"])


def case_question(parts, text="Which slide shows tumour?", **extra):
    return {"model": "chatexaonepath-untrained", "messages": [{"role": "user", "content": [
        *parts, {"type": "text", "text": text}]}], **extra}


def file_part(file_id):
    return {"type": "file", "file": {"file_id": file_id}}


def slide_part(file_id, region=None):
    return {"type": "slide", "slide": {"file_id": file_id, **({"region": region} if region else {})}}


def test_a_case_of_two_slides_is_answered_from_both_labelled_as_the_page_labels_them(api, engine, slides, tumor_file,
                                                                                    stroma_file):
    from openai import OpenAI

    openai = OpenAI(base_url=api, api_key=KEY, max_retries=0)
    http = client(api)
    patches = {f: http.get(f"/files/{f}").json()["slide"]["patches"] for f in (tumor_file, stroma_file)}
    question = "Which slide shows tumour?"
    messages = [{"role": "user", "content": [file_part(tumor_file), file_part(stroma_file),
                                             {"type": "text", "text": question}]}]
    answer = openai.chat.completions.create(model="chatexaonepath-untrained", messages=messages)
    evidence = answer.model_extra["evidence"]
    assert evidence["slides"] == [
        {"number": 1, "file_id": tumor_file, "slide": "tumor.tiff", "region": None,
         "patches_in_scope": patches[tumor_file]},
        {"number": 2, "file_id": stroma_file, "slide": "stroma.tiff", "region": None,
         "patches_in_scope": patches[stroma_file]}]
    assert evidence["file_id"] is None and evidence["region"] is None  # about the whole case, not one slide
    assert evidence["patches_in_scope"] == sum(patches.values()) and len(evidence["patches"]) == 3
    names = {1: (tumor_file, "tumor.tiff"), 2: (stroma_file, "stroma.tiff")}
    assert all((p["file_id"], p["slide"]) == names[p["slide_number"]] for p in evidence["patches"])
    weights = [p["weight"] for p in evidence["patches"]]
    assert weights == sorted(weights, reverse=True)  # the heaviest of the whole case, whichever slide

    # The page's own case of the same two slides answers the same (greedy): same labels, same order, same tokens.
    direct = engine.session("case-check")
    direct.load(slides["tumor"])
    direct.set_adding(True)
    direct.load(slides["stroma"])
    page = direct.ask(question)
    engine.end_session("case-check")
    assert answer.choices[0].message.content == page.text and answer.usage.prompt_tokens == page.prompt_tokens
    single = http.post("/chat/completions", json=ask(tumor_file, question)).json()
    assert answer.usage.prompt_tokens > single["usage"]["prompt_tokens"] + engine.model.config.num_visual_tokens
    # One slide's evidence is as it always was: no case fields.
    assert set(single["evidence"]) == {"file_id", "slide", "region", "patches_in_scope", "patches"}
    assert set(single["evidence"]["patches"][0]) == {"rank", "index", "x", "y", "size", "weight"}

    streamed = list(openai.chat.completions.create(model="chatexaonepath-untrained", messages=messages, stream=True))
    final = [c for c in streamed if c.choices and c.choices[0].finish_reason][0]
    assert final.model_extra["evidence"] == evidence
    # The case lived for its answers only: the first file's session holds its own slide again, not the other's.
    session = engine.find_session(tumor_file, ApiOwner("alpha"))
    assert [s.name for s in session.chat.slides] == ["tumor.tiff"]
    assert [s.name for s in engine.find_session(stroma_file, ApiOwner("alpha")).chat.slides] == ["stroma.tiff"]


def test_regions_in_a_case_each_belong_to_the_slide_their_part_names(api, engine, tumor_file, stroma_file):
    from chatexaonepath.chat.regions import Region

    http = client(api)
    body = {"model": "chatexaonepath-untrained", "messages": [
        {"role": "user", "content": [file_part(tumor_file), slide_part(stroma_file, [0, 0, 1024, 1024]),
                                     {"type": "text", "text": "What is in this part of the second slide?"}]},
        {"role": "assistant", "content": "Stroma."},
        {"role": "user", "content": [slide_part(tumor_file, [1024, 1024, 1024, 1024]),
                                     {"type": "text", "text": "And in this part of the first?"}]}]}
    reply = http.post("/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    evidence = reply.json()["evidence"]
    assert (evidence["file_id"], evidence["slide"], evidence["region"]) == (tumor_file, "tumor.tiff",
                                                                           [1024, 1024, 1024, 1024])
    first, second = evidence["slides"]
    assert first["region"] == [1024, 1024, 1024, 1024] and second["region"] is None
    assert 0 < first["patches_in_scope"] < http.get(f"/files/{tumor_file}").json()["slide"]["patches"]
    assert second["patches_in_scope"] == http.get(f"/files/{stroma_file}").json()["slide"]["patches"]
    assert all(p["slide_number"] == 1 and p["x"] >= 1024 and p["y"] >= 1024 for p in evidence["patches"])
    turns = engine.find_session(tumor_file, ApiOwner("alpha")).turns
    assert (turns[0].slide, turns[0].region) == (1, Region(0, 0, 1024, 1024))  # the earlier question's own slide
    assert (turns[2].slide, turns[2].region) == (0, Region(1024, 1024, 1024, 1024))

    body["messages"][-1]["content"][0] = slide_part(stroma_file, [0, 0, 1024, 1024])
    on_second = http.post("/chat/completions", json=body).json()["evidence"]
    assert on_second["file_id"] == stroma_file and on_second["slides"][0]["region"] is None
    assert all(p["slide_number"] == 2 and p["file_id"] == stroma_file and p["x"] < 1024 and p["y"] < 1024
               for p in on_second["patches"])

    two = case_question([slide_part(tumor_file, [0, 0, 1024, 1024]), slide_part(stroma_file, [0, 0, 1024, 1024])])
    assert "one region" in error_of(http.post("/chat/completions", json=two), 400, "invalid_region")["message"]
    outside = case_question([file_part(tumor_file), slide_part(stroma_file, [10**6, 10**6, 100, 100])])
    error_of(http.post("/chat/completions", json=outside), 400, "invalid_region")


def test_a_case_past_the_servers_limits_or_with_another_keys_file_is_refused_before_any_work(
        api, engine, slides, tumor_file, stroma_file, monkeypatch):
    http = client(api)
    session = engine.find_session(tumor_file, ApiOwner("alpha"))
    turns_before, work_before = list(session.turns), len(session._recent_work)

    # More slides than --max-case-slides (2 here): refused from the request alone, before any file is looked up.
    three = case_question([file_part(tumor_file), file_part(stroma_file), file_part("file-never-uploaded")])
    error = error_of(http.post("/chat/completions", json=three), 400, "too_many_slides")
    assert "2" in error["message"] and "--max-case-slides" in error["message"]

    patches = sum(http.get(f"/files/{f}").json()["slide"]["patches"] for f in (tumor_file, stroma_file))
    monkeypatch.setattr(engine.config, "max_case_patches", patches - 1)
    error = error_of(http.post("/chat/completions", json=case_question([file_part(tumor_file),
                                                                        file_part(stroma_file)])),
                     400, "too_many_patches")
    assert f"{patches:,}" in error["message"] and "--max-case-patches" in error["message"]
    assert session.turns == turns_before and len(session._recent_work) == work_before  # no model work was done
    assert http.post("/chat/completions", json=ask(tumor_file)).status_code == 200  # one slide: no case budget
    monkeypatch.undo()

    # Another key's file in a case is "no such file", exactly as an id that never existed, either way round.
    other = client(api, OTHER_KEY)
    theirs = upload(other, slides["tumor"], name="theirs.tiff").json()["id"]
    try:
        mine_then_theirs = error_of(http.post("/chat/completions", json=case_question(
            [file_part(tumor_file), file_part(theirs)])), 404, "file_not_found")
        never = error_of(http.post("/chat/completions", json=case_question(
            [file_part(tumor_file), file_part("file-never-uploaded")])), 404, "file_not_found")
        assert mine_then_theirs["message"].replace(theirs, "ID") == never["message"].replace("file-never-uploaded",
                                                                                              "ID")
        assert wait_processed(other, theirs)["status"] == "processed"
        error_of(other.post("/chat/completions", json=case_question([file_part(theirs), file_part(tumor_file)])),
                 404, "file_not_found")
        error_of(other.post("/chat/completions", json=case_question([file_part(theirs), file_part(stroma_file)])),
                 404, "file_not_found")
        assert other.post("/chat/completions", json=ask(theirs)).status_code == 200  # its own file answers
        # beta's questions never touched alpha's sessions
        assert len(session._recent_work) == work_before + 1
    finally:
        other.delete(f"/files/{theirs}")
