import pytest

from chatexaonepath.raider.chunking import chunk_report, sections, sentences

REPORT = """CLINICAL HISTORY:
Breast mass, left. Rule out carcinoma.

GROSS DESCRIPTION:
Received in formalin is a lumpectomy specimen measuring approx. 5.2 x 3.1 x 2.0 cm. A firm tan mass
measuring 1.8 cm is identified. Margins are inked.

MICROSCOPIC DESCRIPTION:
Sections show an invasive carcinoma of no special type with tubule formation. Nuclear pleomorphism
is moderate. Mitoses are 8 per 10 HPF.

FINAL DIAGNOSIS:
Left breast, lumpectomy: Invasive ductal carcinoma, Nottingham grade 2. Margins negative.
Lymphovascular invasion: not identified.

COMMENT: Dr. Smith reviewed the case.
"""


def test_sections_are_found_and_named():
    names = [name for name, _, _ in sections(REPORT)]
    assert names == ["clinical", "gross", "microscopic", "diagnosis", "comment"]


def test_sentences_respect_abbreviations_and_numbers():
    text = "A mass measuring approx. 5.2 cm is seen. Dr. Smith agrees. Grade 2."
    spans = [text[a:b] for a, b in sentences(text)]
    assert spans == ["A mass measuring approx. 5.2 cm is seen.", "Dr. Smith agrees.", "Grade 2."]


def test_chunks_keep_sections_offsets_and_size():
    chunks = chunk_report("r1", REPORT, size=120, overlap=1)
    assert {c.section for c in chunks} == {"clinical", "gross", "microscopic", "diagnosis", "comment"}
    for chunk in chunks:
        assert REPORT[chunk.start : chunk.end] == chunk.text
        assert len(chunk.text) <= 120 or "." not in chunk.text[:-1]  # only a single long sentence may exceed
    diagnosis = [c for c in chunks if c.section == "diagnosis"]
    assert any("Invasive ductal carcinoma" in c.text for c in diagnosis)
    assert not any("HPF" in c.text for c in diagnosis)  # never across sections


def test_overlap_repeats_the_boundary_sentence():
    text = "One is here. Two is here. Three is here. Four is here. Five is here."
    chunks = chunk_report("r", text, size=50, overlap=1)
    assert len(chunks) >= 2
    for a, b in zip(chunks, chunks[1:]):
        assert a.text.split(". ")[-1].rstrip(".") in b.text


def test_chunk_ids_are_stable_and_distinct():
    first, second = chunk_report("r1", REPORT), chunk_report("r1", REPORT)
    assert [c.chunk_id for c in first] == [c.chunk_id for c in second]
    assert len({c.chunk_id for c in first}) == len(first)
    assert {c.chunk_id for c in chunk_report("r2", REPORT)}.isdisjoint(c.chunk_id for c in first)


def test_bad_settings_raise():
    with pytest.raises(ValueError):
        chunk_report("r", REPORT, size=10)
    with pytest.raises(ValueError):
        chunk_report("r", REPORT, overlap=-1)
