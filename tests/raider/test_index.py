import pytest

from chatexaonepath.errors import ChatEXAONEPathError
from chatexaonepath.raider.chunking import chunk_report
from chatexaonepath.raider.index import ChunkIndex, Embedder

REPORTS = {
    "r1": "FINAL DIAGNOSIS:\nInvasive ductal carcinoma of the left breast, grade 2.\n\nMARGINS:\nAll margins are "
          "negative for carcinoma.\n\nLYMPH NODES:\nTwo of twelve axillary lymph nodes contain metastatic carcinoma.",
    "r2": "FINAL DIAGNOSIS:\nColon, sigmoid, resection: adenocarcinoma, moderately differentiated.\n\nCOMMENT:\n"
          "Lymphovascular invasion is present.",
}


@pytest.fixture(scope="module")
def embedder():
    return Embedder()  # the embedded all-MiniLM-L6-v2, offline


def chunks():
    return [c for rid, text in REPORTS.items() for c in chunk_report(rid, text, size=120)]


def test_index_is_idempotent_and_retrieval_stays_in_the_report(tmp_path, embedder):
    index = ChunkIndex(tmp_path / "db", embedder)
    first = index.add(chunks())
    assert first.added == len(chunks()) and first.present == 0 and first.removed == 0
    again = index.add(chunks())
    assert (again.added, again.present, again.removed) == (0, len(chunks()), 0) and len(index) == first.added
    assert index.report_ids() == ["r1", "r2"]
    hits = index.retrieve("r1", "How many lymph nodes are involved?", k=2)
    assert "Two of twelve" in hits[0].text and hits[0].section == "lymph_nodes"
    assert all(h.chunk_id.startswith("r1:") for h in hits)
    assert 0.0 < hits[0].score <= 1.0 and hits[0].score >= hits[-1].score
    colon = index.retrieve("r2", "How many lymph nodes are involved?", k=4)
    assert all(h.chunk_id.startswith("r2:") for h in colon)  # never another report's chunks


def test_index_persists_and_rebuild_starts_over(tmp_path, embedder):
    ChunkIndex(tmp_path / "db", embedder).add(chunks())
    assert len(ChunkIndex(tmp_path / "db", embedder)) == len(chunks())
    assert len(ChunkIndex(tmp_path / "db", embedder, rebuild=True)) == 0


def test_mixing_embedders_is_refused(tmp_path, embedder):
    ChunkIndex(tmp_path / "db", embedder).add(chunks())
    embedder_b = Embedder.__new__(Embedder)
    embedder_b.name, embedder_b.model = "another-model", embedder.model
    with pytest.raises(ChatEXAONEPathError, match="built with the embedder"):
        ChunkIndex(tmp_path / "db", embedder_b)


def test_unreachable_chroma_server_is_one_sentence(embedder):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ChatEXAONEPathError, match="Could not open the Chroma server"):
        ChunkIndex(embedder=embedder, host="127.0.0.1", port=port)


HEADED = ("SYNTHETIC PATHOLOGY REPORT (generated, not a patient record)\nSlide: les-0002\n\n"
          "SPECIMEN: Liver.\n\nFINAL DIAGNOSIS:\nLiver: no lesion identified; normal tissue.\n\n"
          "MARGINS: not applicable\n\nMICROSCOPIC DESCRIPTION:\nSections show hepatocyte plates.\n")


def test_retrieval_keeps_to_the_named_sections_and_never_returns_the_header(tmp_path, embedder):
    index = ChunkIndex(tmp_path / "db", embedder)
    index.add(chunk_report("les-0002", HEADED, size=120) + chunks())
    # Unfiltered, the header of titles and disclaimers is a candidate excerpt for a diagnosis question…
    everything = index.retrieve("les-0002", "What is the diagnosis?", k=8)
    assert any("not a patient record" in h.text for h in everything)
    # …named sections keep it (and the other sections) out, whatever k asks for.
    hits = index.retrieve("les-0002", "What is the diagnosis?", k=8, sections=("diagnosis", "microscopic"))
    assert hits and {h.section for h in hits} <= {"diagnosis", "microscopic"}
    assert not any("not a patient record" in h.text or "Slide:" in h.text for h in hits)
    assert "no lesion identified" in hits[0].text
    assert all(h.chunk_id.startswith("les-0002:") for h in hits)


def test_a_report_without_the_named_sections_is_searched_whole(tmp_path, embedder):
    index = ChunkIndex(tmp_path / "db", embedder)
    unheaded = "Sigmoid colon resection showing moderately differentiated adenocarcinoma. Margins are clear."
    index.add(chunk_report("plain-1", unheaded, size=120) + chunks())
    hits = index.retrieve("plain-1", "What is the diagnosis?", k=2, sections=("diagnosis", "synoptic"))
    assert hits and "adenocarcinoma" in hits[0].text and hits[0].section is None
    assert all(h.chunk_id.startswith("plain-1:") for h in hits)  # the fallback stays in the report too
