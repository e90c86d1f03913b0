"""Long reports → the passages the judge needs, with RAIDER's chunking and embedder.

A report that fits the judge's budget is sent whole. A longer one is cut into RAIDER's
sentence-aware chunks, ranked by cosine similarity to the question *and* the candidate answer
(the judge must check the answer's claims, so passages that could support them are retrieved
too), and the best chunks that fit the budget are sent in report order. Ranking happens in
memory: a judge run needs no persistent Chroma index, and the same Embedder as RAIDER is used.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..raider.chunking import Chunk, chunk_report

logger = logging.getLogger(__name__)


@dataclass
class ReportContext:
    """The report text given to the judge for one item."""

    text: str
    excerpted: bool = False
    chunk_ids: list[str] = field(default_factory=list)


class ReportExcerpter:
    """Chooses, per (report, question, answer), the whole report or its most relevant passages."""

    def __init__(self, max_chars: int = 6000, chunk_chars: int = 600, embedder: str | object = "embedded") -> None:
        self.max_chars, self.chunk_chars = max_chars, min(chunk_chars, max_chars)
        self._embedder_spec, self._embedder = embedder, None
        self._chunks: dict[str, tuple[list[Chunk], np.ndarray]] = {}

    @property
    def embedder(self):
        """The RAIDER Embedder, loaded on first use (short reports never need it)."""
        if self._embedder is None:
            if isinstance(self._embedder_spec, str):
                from ..raider.index import Embedder

                self._embedder = Embedder(self._embedder_spec)
            else:
                self._embedder = self._embedder_spec
        return self._embedder

    def contexts(self, items: Sequence[tuple[str | None, str, str]]) -> list[ReportContext]:
        """ReportContext for each (report_id, report, question + answer query), in order."""
        out: list[ReportContext | None] = [None] * len(items)
        long_items = []
        for i, (report_id, report, query) in enumerate(items):
            if len(report) <= self.max_chars:
                out[i] = ReportContext(report)
            else:
                long_items.append(i)
        if long_items:
            queries = np.asarray(self.embedder.encode([items[i][2] for i in long_items]), dtype=np.float32)
            for i, query_vector in zip(long_items, queries):
                report_id, report, _ = items[i]
                out[i] = self._excerpt(report_id, report, query_vector)
            logger.info("%d long report(s) replaced by their most relevant passages", len(long_items))
        return out  # type: ignore[return-value]

    def _excerpt(self, report_id: str | None, report: str, query_vector: np.ndarray) -> ReportContext:
        key = hashlib.sha256(report.encode()).hexdigest()
        if key not in self._chunks:
            # No overlap: chunks are picked independently, and a repeated sentence would only spend budget.
            chunks = chunk_report(report_id or key[:12], report, size=self.chunk_chars, overlap=0)
            vectors = np.asarray(self.embedder.encode([c.text for c in chunks]), dtype=np.float32)
            self._chunks[key] = (chunks, vectors)
        chunks, vectors = self._chunks[key]
        scores = vectors @ query_vector  # both L2-normalised: cosine similarity
        chosen, used = [], 0
        for index in np.argsort(-scores, kind="stable"):
            size = len(chunks[index].text) + 8
            if chosen and used + size > self.max_chars:
                continue
            chosen.append(int(index))
            used += size
        chosen.sort(key=lambda j: chunks[j].start)
        text = "\n[…]\n".join((f"[{chunks[j].section}] " if chunks[j].section else "") + chunks[j].text for j in chosen)
        return ReportContext(text, True, [chunks[j].chunk_id for j in chosen])
