"""A local search tool: BM25 (``bm25s``) over a closed corpus of {title, text} passages.

The result of a call is the top ``k`` passages, each formatted ``"Title: text"`` and cut to
``max_passage_chars``, separated by blank lines; the whole result is cut to ``max_output_chars``. The query
is cut to ``max_query_chars`` (whitespace collapsed) before anything else, so a huge query costs no more than
a long one and is never echoed back whole.
"""

from __future__ import annotations

import json
from pathlib import Path

from appo.tools.base import Tool


class SearchTool(Tool):
    """BM25 retrieval over ``corpus`` (a list of dicts with "title" and "text"); ``run`` never raises."""

    name = "search"
    tag = "search"

    def __init__(self, corpus: list[dict], k: int = 3, max_passage_chars: int = 400,
                 max_output_chars: int = 1400, max_query_chars: int = 300):
        import bm25s  # imported here: it pulls numpy/scipy, which the other tools do not need

        if not corpus:
            raise ValueError("corpus: need at least one passage")
        for i, passage in enumerate(corpus):
            if not isinstance(passage, dict) or not isinstance(passage.get("title"), str) \
                    or not isinstance(passage.get("text"), str):
                raise ValueError(f"corpus: item {i} is not a dict with string 'title' and 'text'")
        if k < 1:
            raise ValueError(f"k: must be at least 1, got {k}")
        for arg, value in (("max_passage_chars", max_passage_chars), ("max_output_chars", max_output_chars),
                           ("max_query_chars", max_query_chars)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg}: must be a positive integer, got {value!r}")
        self.corpus, self.k, self.max_query_chars = list(corpus), k, max_query_chars
        self.max_passage_chars, self.max_output_chars = max_passage_chars, max_output_chars
        self._bm25s = bm25s
        self._retriever = bm25s.BM25()
        documents = [f"{p['title']} {p['text']}" for p in self.corpus]
        self._retriever.index(self._tokenize(documents), show_progress=False)

    @classmethod
    def from_jsonl(cls, path: str | Path, **options) -> "SearchTool":
        """Build from a jsonl file with one {"title": ..., "text": ...} object per line."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"path: no such file {path}")
        with path.open(encoding="utf-8") as handle:
            corpus = [json.loads(line) for line in handle if line.strip()]
        return cls(corpus, **options)

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        return self._bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)

    def search(self, query: str, k: int | None = None) -> list[dict]:
        """Top-k passages (dicts of the corpus) for ``query``, best first; [] when no query word is known."""
        k = min(k or self.k, len(self.corpus))
        tokens = self._tokenize([query])
        if not any(token in self._retriever.vocab_dict for token in tokens[0]):
            return []
        indices, scores = self._retriever.retrieve(tokens, k=k, show_progress=False)
        return [self.corpus[int(i)] for i, s in zip(indices[0], scores[0]) if s > 0]

    def run(self, text: str) -> str:
        if not isinstance(text, str):
            return f"Error: expected a text query, got {type(text).__name__}"
        query = " ".join(text[: 4 * self.max_query_chars].split())[: self.max_query_chars].rstrip()
        if not query:
            return "Error: empty search query"
        try:
            passages = self.search(query)
        except Exception as error:  # the tool contract: never raise into the rollout loop
            return f"Error: search failed: {type(error).__name__}: {error}"
        if not passages:
            shown = query if len(query) <= 80 else query[:77] + "..."
            return f"No results for {shown!r}."
        return self.truncate("\n\n".join(self._format(p) for p in passages))

    def _format(self, passage: dict) -> str:
        text = f"{passage['title']}: {passage['text'].strip()}"
        return text if len(text) <= self.max_passage_chars else text[: self.max_passage_chars - 3] + "..."


def build_hotpotqa_corpus(path: str | Path | None = None) -> list[dict]:
    """Union of the context paragraphs of a HotpotQA distractor file, deduplicated by title (first wins).

    path: a file or folder, else the HotpotQA task's data (``appo.tasks.data.load_rows``). Returns
    [{"title", "text"}, ...] with the paragraph's sentences joined.
    """
    from appo.tasks.data import load_rows

    rows = load_rows("hotpotqa", path)
    corpus, seen = [], set()
    for row in rows:
        context = row["context"]
        for title, sentences in zip(context["title"], context["sentences"]):
            if title not in seen:
                seen.add(title)
                corpus.append({"title": title, "text": "".join(sentences).strip()})
    return corpus
