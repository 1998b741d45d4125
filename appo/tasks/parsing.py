"""Reading the tag structure of agent text: tool calls, the final answer, and format checking.

Tags: ``<think>..</think>`` (optional reasoning), tool calls ``<python>..</python>``, ``<search>..</search>``,
``<calculator>..</calculator>``, each answered by a ``<result>..</result>`` block the environment appends, and
one final ``<answer>..</answer>``. Result blocks are opaque: tags printed by a tool do not count, and an
unclosed ``<result>`` runs to the end of the text.

The closing-tag rule (one rule for the rollout engine, every backend and the reward): inside python code, a
string literal or a comment is code, so a closing tag that sits in one is part of the code and ends nothing
(``print("</python>")`` runs whole). Strings are found by a scan of quotes, backslashes and comments from the
call's opening tag: the code is never compiled or evaluated (model text is hostile), and each function here
runs in time linear in the text. The scan reads the text left to right only, so a verdict taken as each
token arrives (``closing_tag_counts``, what the engine does) is the verdict on the whole text:

- a comment runs to the end of its line, or to a ``</python>`` (which closes the call);
- a string still open where the text stops keeps every closing tag after its quote;
- a one-line string (``'`` or ``"``) broken by a newline voids the call (the code cannot run as written): a
  later ``</python>`` closes nothing until a new ``<python>`` opens a call;
- a call's body starts after the nearest ``<python>`` that is not inside one of its strings or comments.

Tool output is escaped before it enters a rollout (``escape_tool_output``) and is never part of the text a
reward reads (``appo.rollout.tool_loop.graded_text`` keeps each result block empty).
"""

from __future__ import annotations

import re
from typing import NamedTuple

TOOL_TAGS = ("python", "search", "calculator")

_PYTHON_TOKEN = re.compile(r"</?python>|#|'''|\"\"\"|'|\"")
_COMMENT = re.compile(r"#(?:[^\n<]|<(?!/python>))*")  # to the end of the line or the closing tag
_STRING_BODY = {  # from just after the opening quote to just before the closing one
    "'": re.compile(r"(?:[^\\\n']|\\.)*", re.DOTALL),
    '"': re.compile(r'(?:[^\\\n"]|\\.)*', re.DOTALL),
    "'''": re.compile(r"(?:[^\\']|\\.|'(?!''))*", re.DOTALL),
    '"""': re.compile(r'(?:[^\\"]|\\.|"(?!""))*', re.DOTALL),
}


class _Code(NamedTuple):
    """A python call's scan: closing (index of its ``</python>``, None if it has none), resume (where the scan
    of the text goes on: after the closing tag, at the newline that voided the call, None at the end), body
    (start of the code, after the nearest opening tag), literals ([start, end) of its strings and comments)."""

    closing: int | None
    resume: int | None
    body: int
    literals: list[tuple[int, int]]


def _scan_code(text: str, start: int) -> _Code:
    """Scan python code from ``text[start]`` (just after ``<python>``) by the closing-tag rule."""
    body = position = start
    literals = []
    while (token := _PYTHON_TOKEN.search(text, position)) is not None:
        kind, at = token.group(), token.start()
        if kind == "</python>":
            return _Code(at, token.end(), body, literals)
        if kind == "<python>":
            body = position = token.end()
            continue
        if kind == "#":
            position = _COMMENT.match(text, at).end()
            literals.append((at, position))
            continue
        stop = _STRING_BODY[kind].match(text, token.end()).end()
        if text.startswith(kind, stop):
            position = stop + len(kind)
            literals.append((at, position))
        elif len(kind) == 1 and text.startswith("\n", stop):
            literals.append((at, stop))
            return _Code(None, stop, body, literals)  # a one-line string broken by a newline: call void
        else:
            literals.append((at, len(text)))
            break  # a string still open at the end: it holds the rest of the text
    return _Code(None, None, body, literals)


_TOP_LEVEL = re.compile("<(python|result)>")


def _regions(text: str) -> tuple[list[tuple[int, _Code]], list[tuple[int, int]]]:
    """One left-to-right pass: the python calls ([(opening index, scan)]) and the result blocks ([start, end),
    an unclosed one to the end). Each is skipped whole, so a tag inside a result or a string is neither."""
    calls, results, position = [], [], 0
    while (match := _TOP_LEVEL.search(text, position)) is not None:
        if match.group(1) == "result":
            end = text.find("</result>", match.end())
            position = len(text) if end < 0 else end + len("</result>")
            results.append((match.start(), position))
            continue
        code = _scan_code(text, match.end())
        calls.append((match.start(), code))
        if code.resume is None:
            break
        position = code.resume
    return calls, results


def closing_tag_counts(text: str, index: int) -> bool:
    """Whether the closing tag that starts at ``text[index]`` counts, i.e. ends a model turn: False when it
    lies inside a string literal or a comment of python code (the closing-tag rule above), True otherwise.

    text: the model's turn so far (the rollout engine asks when a token completes a stop tag). Only
    ``text[:index]`` decides, so the engine's verdict is the parser's on the finished text."""
    calls, _ = _regions(text)
    return not any(a < index < b for _, code in calls for a, b in code.literals)


def tool_call_span(text: str, tags=TOOL_TAGS) -> tuple[str, int, int] | None:
    """``(tag, body start, closing-tag index)`` of the FIRST complete tool call in ``text``, or None.

    "First" is by closing tag: the engine stops generating at a closing tag that counts, so that call is the
    one it runs. A closing tag inside a result block or inside a python string or comment does not count; one
    with no opening tag before it is skipped. The body starts after the nearest opening tag (a python opening
    inside a string of the code does not count)."""
    tags = (tags,) if isinstance(tags, str) else tuple(tags)
    if not tags:
        raise ValueError("tags: need at least one tool tag")
    calls, results = _regions(text)
    python_body = {code.closing: code.body for _, code in calls if code.closing is not None}
    hidden = sorted(results + [span for _, code in calls for span in code.literals])
    names = "|".join(re.escape(t) for t in dict.fromkeys(tags))
    last_opening: dict[str, int] = {}
    k = 0
    for match in re.finditer(f"<(/?)({names})>", text):
        at = match.start()
        while k < len(hidden) and hidden[k][1] <= at:
            k += 1
        if k < len(hidden) and hidden[k][0] <= at:
            continue
        closing, tag = match.group(1) == "/", match.group(2)
        if tag == "python":
            if closing and at in python_body:
                return tag, python_body[at], at
        elif not closing:
            last_opening[tag] = match.end()
        elif tag in last_opening:
            return tag, last_opening[tag], at
    return None


def find_tool_call(text: str, tags=TOOL_TAGS) -> tuple[str, str] | None:
    """The FIRST complete tool call in ``text`` (one turn of model text) -> (tag, body), or None.

    Calls are found as ``tool_call_span`` finds them. Later calls in the same text are ignored (the engine
    cuts the turn after the first call and appends its result). An opening tag without its closing tag is no
    call (None: keep generating). The body is the raw text between the tags (no stripping). Linear in the text.
    """
    span = tool_call_span(text, tags)
    return None if span is None else (span[0], text[span[1]:span[2]])


def _blank_spans(text: str, spans) -> str:
    """``text`` with each [start, end) of ``spans`` (sorted, disjoint) replaced by as many spaces."""
    pieces, position = [], 0
    for start, end in spans:
        pieces += [text[position:start], " " * (end - start)]
        position = end
    return "".join(pieces) + text[position:]


_OPENING_PLAIN_CALL = re.compile("<(" + "|".join(t for t in TOOL_TAGS if t != "python") + ")>")


def _blank_closed(opening: re.Pattern, text: str) -> str:
    """``text`` with every complete block (an ``opening`` match, whose group 1 is the tag name, to the first
    closing tag of that name) replaced by as many spaces; linear: once a tag has no closing tag left, its later
    openings are not searched again."""
    pieces, position, unclosed = [], 0, set()
    for match in opening.finditer(text):
        tag = match.group(1)
        if match.start() < position or tag in unclosed:
            continue
        end = text.find(f"</{tag}>", match.end())
        if end < 0:
            unclosed.add(tag)
            continue
        end += len(f"</{tag}>")
        pieces += [text[position:match.start()], " " * (end - match.start())]
        position = end
    return "".join(pieces) + text[position:]


def extract_answer(text: str) -> str | None:
    """Content (stripped) of the LAST complete ``<answer>..</answer>`` of the model's own text, else None.

    Tool output is ignored wherever it sits: result blocks are cut out of the answer's content (an answer
    block with a result inside reads as the model's text around it), and an answer inside a result block,
    inside a complete tool call, or inside a string or comment of python code is none (an answer printed by
    code or a tool is not the model's final answer)."""
    calls, results = _regions(text)
    hidden = [(opening, code.resume) for opening, code in calls if code.closing is not None]
    hidden += [span for _, code in calls if code.closing is None for span in code.literals]
    visible = _blank_closed(_OPENING_PLAIN_CALL, _blank_spans(text, sorted(results + hidden)))
    end = visible.rfind("</answer>")
    begin = visible.rfind("<answer>", 0, end) if end >= 0 else -1
    if begin < 0:
        return None
    inside = [(a, b) for a, b in results if begin < a < end]
    pieces, position = [], begin + len("<answer>")
    for start, stop in inside:
        pieces.append(text[position:start])
        position = stop
    return ("".join(pieces) + text[position:end]).strip()


_STRUCTURE_TAGS = ("think", "answer", "result")


def check_format(response: str, tool_tags=TOOL_TAGS) -> tuple[bool, str]:
    """Check the tag structure of a whole response -> (ok, reason); reason is "" when ok.

    Well formed: any sequence of free text, ``<think>..</think>`` blocks and tool calls, where each tool call
    is followed (only whitespace between) by a closed ``<result>..</result>`` block; then exactly one
    ``<answer>..</answer>`` with only whitespace after it. No nesting (no tag inside think/answer), no
    unclosed tag, no stray closing tag, no result block without a call. A python call ends by the closing-tag
    rule (module docstring).
    """
    tool_tags = (tool_tags,) if isinstance(tool_tags, str) else tuple(tool_tags)
    names = "|".join(re.escape(t) for t in (*_STRUCTURE_TAGS, *tool_tags))
    tag_pattern = re.compile(f"<(/?)({names})>")
    position, pending_call, answer_end = 0, None, None
    while (match := tag_pattern.search(response, position)) is not None:
        is_closing, name = match.group(1) == "/", match.group(2)
        if answer_end is not None:
            return False, f"<{match.group(1)}{name}> after </answer>"
        if is_closing:
            return False, f"stray </{name}>"
        if pending_call is not None and name != "result":
            return False, f"<{pending_call}> call not followed by <result>"
        if name == "result":
            if pending_call is None or response[position:match.start()].strip():
                return False, "<result> block without a tool call right before it"
            end = response.find("</result>", match.end())
            if end < 0:
                return False, "unclosed <result>"
            position, pending_call = end + len("</result>"), None
        elif name in tool_tags:
            end = _closing_of_call(response, name, match.end())
            if end is None:
                return False, f"unclosed <{name}>"
            position, pending_call = end + len(f"</{name}>"), name
        else:  # think or answer
            end = response.find(f"</{name}>", match.end())
            if end < 0:
                return False, f"unclosed <{name}>"
            inner = tag_pattern.search(response, match.end(), end)
            if inner is not None:
                return False, f"tag {inner.group(0)} inside <{name}>"
            position = end + len(f"</{name}>")
            if name == "answer":
                answer_end = position
    if pending_call is not None:
        return False, f"<{pending_call}> call not followed by <result>"
    if answer_end is None:
        return False, "no <answer>"
    if response[answer_end:].strip():
        return False, "text after </answer>"
    return True, ""


def _closing_of_call(text: str, tag: str, body_start: int) -> int | None:
    """Index of the ``</tag>`` that closes a call whose body starts at ``body_start`` (closing-tag rule)."""
    if tag == "python":
        return _scan_code(text, body_start).closing
    end = text.find(f"</{tag}>", body_start)
    return end if end >= 0 else None


_STRUCTURE_OR_TOOL_TAG = re.compile(r"<(\s*/?\s*(?:think|answer|result|python|search|calculator)\b)",
                                    re.IGNORECASE)


def escape_tool_output(text: str, tags=()) -> str:
    """``text`` (a tool's output) with the ``<`` of anything that could read as a tag written ``&lt;``: the
    structure tags (think, answer, result), the tool tags and ``tags`` (extra tag names), in any letter case,
    with or without a slash or spaces. Every other character is kept, so ``x < 3`` or ``<class 'int'>`` read
    as before. After this a tool's output can neither close its own result block nor open an answer in the
    text a model reads; the tokens it becomes are plain text (``appo.rollout.tool_loop.encode_plain``)."""
    if not isinstance(text, str):
        raise ValueError(f"text: expected a string, got {type(text).__name__}")
    pattern = _STRUCTURE_OR_TOOL_TAG
    extra = [t for t in tags if t.lower() not in (*_STRUCTURE_TAGS, *TOOL_TAGS)]
    if extra:
        names = "|".join(re.escape(t) for t in (*_STRUCTURE_TAGS, *TOOL_TAGS, *extra))
        pattern = re.compile(rf"<(\s*/?\s*(?:{names})\b)", re.IGNORECASE)
    return pattern.sub(r"&lt;\1", text)
