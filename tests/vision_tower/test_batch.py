"""The batch job: resume, skip, locks and bad slides."""

import json
from pathlib import Path

import pytest

from chatexaonepath.errors import SlideError
from chatexaonepath.vision_tower.batch import ErrorsLog, SlideLock, extract_slides
from chatexaonepath.vision_tower.extraction import ExtractConfig, FeatureExtractor
from chatexaonepath.vision_tower.features import read_features


def test_rerun_skips_done_slides_and_redoes_changed_settings(slides, tmp_path, extractor, tiny_encoder):
    extract_slides([slides["tumor"]], tmp_path, extractor.config, extractor=extractor)
    before = (tmp_path / "tumor.h5").stat().st_mtime_ns
    again = extract_slides([slides["tumor"]], tmp_path, extractor.config, extractor=extractor)
    assert again.count("skipped") == 1 and (tmp_path / "tumor.h5").stat().st_mtime_ns == before
    changed = ExtractConfig(encoder=tiny_encoder.name, num_workers=0, min_tissue=0.9)
    redo = extract_slides([slides["tumor"]], tmp_path, changed, extractor=FeatureExtractor(changed, tiny_encoder))
    assert redo.count("extracted") == 1
    assert read_features(tmp_path / "tumor.h5").attrs["min_tissue"] == 0.9


def test_interrupted_batch_resumes(slides, tmp_path, extractor):
    inputs = [slides["tumor"], slides["stroma"], slides["normal_20x"]]
    calls = []

    def kill_during_second(slide, total):
        calls.append(slide.slide_id)
        if len(calls) == 2:
            def die(done, _total):
                raise KeyboardInterrupt  # what Ctrl-C or a kill does mid-slide
            return die
        return None

    with pytest.raises(KeyboardInterrupt):
        extract_slides(inputs, tmp_path, extractor.config, extractor=extractor, on_slide_start=kill_during_second)
    assert (tmp_path / "tumor.h5").exists() and not (tmp_path / "stroma.h5").exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.lock"))
    resumed = extract_slides(inputs, tmp_path, extractor.config, extractor=extractor)
    assert [r.status for r in resumed.results] == ["skipped", "extracted", "extracted"]


def test_bad_slides_are_recorded_and_the_batch_goes_on(slides, tmp_path, extractor):
    inputs = [slides["text_as_svs"], slides["tumor"], slides["no_mpp"], slides["blank"]]
    summary = extract_slides(inputs, tmp_path, extractor.config, extractor=extractor)
    assert [r.status for r in summary.results] == ["failed", "extracted", "failed", "failed"]
    errors = [json.loads(line) for line in summary.errors_file.read_text().splitlines()]
    assert len(errors) == 3
    assert "--mpp" in errors[1]["error"] and "No tissue" in errors[2]["error"]
    with pytest.raises(SlideError):
        extract_slides(inputs, tmp_path / "ff", extractor.config, extractor=extractor, skip_errors=False)


def test_live_locks_are_respected_and_dead_ones_ignored(slides, tmp_path, extractor):
    held = SlideLock(tmp_path / "tumor.lock")
    assert held.acquire()  # another worker is on this slide
    summary = extract_slides([slides["tumor"]], tmp_path, extractor.config, extractor=extractor)
    assert summary.results[0].status == "locked" and not (tmp_path / "tumor.h5").exists()
    held.release()
    # a lock file left by a killed process holds no flock: the slide is simply taken
    (tmp_path / "tumor.lock").write_text(json.dumps({"host": "gone", "pid": 1}))
    summary = extract_slides([slides["tumor"]], tmp_path, extractor.config, extractor=extractor)
    assert summary.results[0].status == "extracted" and not (tmp_path / "tumor.lock").exists()


def test_leftovers_of_a_killed_run_are_removed_but_not_other_slides(slides, tmp_path, extractor):
    (tmp_path / "thumbnails").mkdir(parents=True)
    mine = [tmp_path / ".tumor.h5.4242.tmp", tmp_path / "thumbnails" / ".tumor.4242.tmp.png",
            tmp_path / ".tumor.h5.4242.0a1b2c3d.tmp.h5", tmp_path / "thumbnails" / ".tumor.png.4242.0a1b2c3d.tmp.png"]
    others = [tmp_path / ".tumor.v2.h5.4242.tmp",  # the id "tumor.v2" is another slide
              tmp_path / "thumbnails" / ".tumor.2x.png.4242.0a1b2c3d.tmp.png"]  # and so is "tumor.2x"
    for path in [*mine, *others]:
        path.write_bytes(b"partial")
    extract_slides([slides["tumor"]], tmp_path, extractor.config, extractor=extractor)
    assert not any(p.exists() for p in mine) and all(p.exists() for p in others)


def test_changing_mpp_override_re_extracts(slides, tmp_path, tiny_encoder):
    first = ExtractConfig(encoder=tiny_encoder.name, num_workers=0, mpp=0.25)
    extract_slides([slides["no_mpp"]], tmp_path, first, extractor=FeatureExtractor(first, tiny_encoder))
    second = ExtractConfig(encoder=tiny_encoder.name, num_workers=0, mpp=0.3)
    summary = extract_slides([slides["no_mpp"]], tmp_path, second, extractor=FeatureExtractor(second, tiny_encoder))
    assert summary.count("extracted") == 1
    assert read_features(tmp_path / "no_mpp.h5").attrs["level0_mpp"] == 0.3


def test_errors_of_other_slides_survive_a_rerun(slides, tmp_path, extractor):
    extract_slides([slides["text_as_svs"]], tmp_path, extractor.config, extractor=extractor)
    extract_slides([slides["tumor"]], tmp_path, extractor.config, extractor=extractor)
    errors = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert [e["slide"] for e in errors] == [str(slides["text_as_svs"])]


def test_duplicate_slide_ids_are_rejected(slides, tmp_path, extractor):
    from chatexaonepath.errors import ChatEXAONEPathError

    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "tumor.tiff").write_bytes(slides["tumor"].read_bytes())
    with pytest.raises(ChatEXAONEPathError, match="share the id"):
        extract_slides([slides["tumor"], other / "tumor.tiff"], tmp_path / "o", extractor.config, extractor=extractor)


def test_a_fixed_slide_loses_its_old_error(slides, tmp_path, extractor):
    slide = tmp_path / "in" / "case7.tiff"
    slide.parent.mkdir()
    slide.write_text("scanner crashed while writing\n" * 50)
    extract_slides([slide], tmp_path / "out", extractor.config, extractor=extractor)
    assert len((tmp_path / "out" / "errors.jsonl").read_text().splitlines()) == 1
    slide.write_bytes(slides["tumor"].read_bytes())  # rescanned
    summary = extract_slides([slide, slides["text_as_svs"]], tmp_path / "out", extractor.config, extractor=extractor)
    assert [r.status for r in summary.results] == ["extracted", "failed"]
    errors = [json.loads(line) for line in summary.errors_file.read_text().splitlines()]
    assert [e["slide"] for e in errors] == [str(slides["text_as_svs"])]


def _append_failures(path, prefix: str, count: int) -> None:
    log = ErrorsLog(path)
    for i in range(count):
        log.append(Path(f"/{prefix}/{i}.svs"), f"failure {i}")


def test_errors_log_loses_no_record_while_another_process_compacts(tmp_path):
    """Several appending processes and a compacting one: every failure is still there at the end."""
    import multiprocessing

    path = tmp_path / "errors.jsonl"
    context = multiprocessing.get_context("fork")  # the target only writes files: no threads to copy
    writers = [context.Process(target=_append_failures, args=(path, f"w{w}", 300)) for w in range(3)]
    for writer in writers:
        writer.start()
    log, compactions = ErrorsLog(path), 0
    while any(w.is_alive() for w in writers) or compactions == 0:
        log.compact()
        compactions += 1
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    log.compact()
    assert len(log.failures()) == 900 and len(path.read_text().splitlines()) == 900
    log.append(Path("/w0/7.svs"), None)  # cleared
    log.compact()
    assert "/w0/7.svs" not in log.failures() and len(log.failures()) == 899
