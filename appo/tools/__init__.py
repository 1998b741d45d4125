"""Tools an agent calls with ``<tag>text</tag>``: a sandboxed Python interpreter, a calculator, local search.

``make_tools(["python", "search"], python={"timeout_s": 3}, search={"k": 2})`` builds them keyed by tag.
The tool classes are imported lazily (search pulls in bm25s/numpy, which the others do not need).
"""

from __future__ import annotations

from importlib import import_module

from appo import _lazy_exports
from appo.tools.base import Tool

_CLASSES = {"python": ("appo.tools.python_sandbox", "PythonTool"),
            "calculator": ("appo.tools.calculator", "CalculatorTool"),
            "search": ("appo.tools.search", "SearchTool")}
_EXPORTS = {cls: module for module, cls in _CLASSES.values()} | {"build_hotpotqa_corpus": "appo.tools.search"}

__all__ = ["Tool", "make_tools", *sorted(_EXPORTS)]


def make_tools(names: list[str] | tuple[str, ...], **options: dict) -> dict[str, Tool]:
    """Build the named tools -> {tag: tool}.

    names: any of "python", "calculator", "search". options: per tool name, the keyword arguments of its
    constructor. For "search", ``corpus=`` (list of {title, text}) or ``path=`` (jsonl) picks the corpus; the
    default is ``build_hotpotqa_corpus()``.
    """
    if isinstance(names, str):
        raise ValueError(f"names: expected a list of tool names, got the string {names!r}")
    unknown = [n for n in names if n not in _CLASSES]
    if unknown:
        raise ValueError(f"names: unknown tools {unknown}; known: {sorted(_CLASSES)}")
    extra = sorted(set(options) - set(names))
    if extra:
        raise ValueError(f"options: given for tools that were not requested: {extra}")
    tools = {}
    for name in names:
        kwargs = dict(options.get(name) or {})
        module, cls_name = _CLASSES[name]
        cls = getattr(import_module(module), cls_name)
        if name == "search":
            path = kwargs.pop("path", None)
            if path is not None:
                tool = cls.from_jsonl(path, **kwargs)
            else:
                corpus = kwargs.pop("corpus", None)
                if corpus is None:
                    corpus = import_module(module).build_hotpotqa_corpus()
                tool = cls(corpus, **kwargs)
        else:
            tool = cls(**kwargs)
        tools[tool.tag] = tool
    return tools


__getattr__ = _lazy_exports(__name__, _EXPORTS, globals())
