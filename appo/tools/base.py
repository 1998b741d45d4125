"""The one small interface every tool implements.

A tool is called when the model writes ``<tag>text</tag>``; the environment runs ``tool.run(text)`` and
appends ``<result>returned string</result>`` to the rollout (masked out of training).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor


class Tool(ABC):
    """name: a short identifier; tag: the XML-like tag the model writes; max_output_chars: result truncation."""

    name: str = "tool"
    tag: str = "tool"
    max_output_chars: int = 1024
    parallel: bool = True  # may several calls run at once

    @abstractmethod
    def run(self, text: str) -> str:
        """Run one call on the text between the tags; always returns a string (errors included), never raises."""

    def run_batch(self, texts: list[str], max_workers: int = 8) -> list[str]:
        """Run several calls, in parallel threads when ``parallel`` (each call may itself spawn a process)."""
        if not self.parallel or len(texts) <= 1:
            return [self.run(t) for t in texts]
        with ThreadPoolExecutor(max_workers=min(max_workers, len(texts))) as pool:
            return list(pool.map(self.run, texts))

    def truncate(self, text: str) -> str:
        if len(text) <= self.max_output_chars:
            return text
        return text[: self.max_output_chars] + f"\n...[truncated {len(text) - self.max_output_chars} chars]"
