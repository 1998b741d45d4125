"""Reading the tag structure of agent text: tool calls, the final answer, and format checking.

Tags: ``<think>..</think>`` (optional reasoning), tool calls ``<python>..</python>``, ``<search>..</search>``,
``<calculator>..</calculator>``, each answered by a ``<result>..</result>`` block the environment appends, and
one final ``<answer>..</answer>``. Result blocks are opaque: tags printed by a tool do not count.

Closing-tag rule for tool calls: a call ends at its first closing tag, except that for ``python`` a
``</python>`` that falls inside a string literal of the code so far (the code up to it fails to compile with
"unterminated string") is part of the code. A call's opening tag is the nearest ``<tag>`` before its closing
tag (so a tag merely mentioned earlier, e.g. inside <think>, is skipped), again skipping an opening tag that
sits inside a string of the code. Strings are found by a scan of quotes, backslashes and comments: the code is
never compiled or evaluated (model text is hostile), and each function here runs in time linear in the text.

Tool output is escaped before it enters a rollout (``escape_tool_output``): it can never open or close a tag,
so a result block always ends where the environment closed it.
"""

from __future__ import annotations

import re

TOOL_TAGS = ("python", "search", "calculator")
_OPENING_RESULT = re.compile("<(result)>")
_RESULT_TO_END = re.compile(r"<result>.*?(?:</result>|\Z)", re.DOTALL)  # an unclosed block runs to the end


def find_tool_call(text: str, tags=TOOL_TAGS) -> tuple[str, str] | None:
    """The FIRST complete tool call in ``text`` (one turn of model text) -> (tag, body), or None.

    "First" is by closing tag: the engine stops generating at a closing tag, so that call is the one it runs.
    Later calls in the same text are ignored (the engine cuts the turn after the first call and appends its
    result). An opening tag without its closing tag is no call (None: keep generating). The body is the raw
    text between the tags (no stripping). Linear in the text.
    """
    tags = (tags,) if isinstance(tags, str) else tuple(tags)
    if not tags:
        raise ValueError("tags: need at least one tool tag")
    visible = _blank_closed(_OPENING_RESULT, text)
    best = None
    for tag in dict.fromkeys(tags):
        span = _first_python_call(visible) if tag == "python" else _first_plain_call(visible, tag)
        if span is not None and (best is None or span[1] < best[1][1]):
            best = tag, span
    if best is None:
        return None
    tag, (begin, end) = best
    return tag, text[begin:end]


def _first_plain_call(text: str, tag: str) -> tuple[int, int] | None:
    """(body start, closing tag index) of the first ``<tag>..</tag>`` by closing tag, nearest opening."""
    opening, closing = f"<{tag}>", f"</{tag}>"
    first_open = text.find(opening)
    if first_open < 0:
        return None
    end = text.find(closing, first_open + len(opening))
    if end < 0:
        return None
    return text.rfind(opening, first_open, end) + len(opening), end


_PYTHON_SCAN = re.compile(r"</?python>|#(?:[^\n<]|<(?!/?python>))*|'''|\"\"\"|'|\"")


def _first_python_call(text: str) -> tuple[int, int] | None:
    """(body start, closing tag index) of the first python call: one left-to-right scan in which string
    literals and comments of the code are skipped, a later opening tag outside a string restarts the body
    (the nearest opening wins), and a string that never closes sends the scan to the next opening tag."""
    body, position = None, 0
    while True:
        if body is None:
            opening = text.find("<python>", position)
            if opening < 0:
                return None
            body = position = opening + len("<python>")
        token = _PYTHON_SCAN.search(text, position)
        if token is None:
            return None
        kind = token.group()
        if kind == "</python>":
            return body, token.start()
        if kind == "<python>":
            body = position = token.end()
        elif kind.startswith("#"):
            position = token.end()
        else:
            closed = _STRING_END[kind].match(text, token.end())
            if closed is None:
                body, position = None, token.end()
            else:
                position = closed.end()


_CODE_TOKEN = re.compile(r"#[^\n]*|'''|\"\"\"|'|\"")  # a comment or the quote that opens a string
_STRING_END = {  # from just after the opening quote to just after the closing one (None: never closed)
    "'": re.compile(r"(?:[^\\\n']|\\.)*'", re.DOTALL),
    '"': re.compile(r'(?:[^\\\n"]|\\.)*"', re.DOTALL),
    "'''": re.compile(r"(?:[^\\']|\\.|'(?!''))*'''", re.DOTALL),
    '"""': re.compile(r'(?:[^\\"]|\\.|"(?!""))*"""', re.DOTALL),
}


def _blank(pattern: re.Pattern, text: str) -> str:
    """``text`` with every match of ``pattern`` replaced by as many spaces (positions unchanged)."""
    return pattern.sub(lambda m: " " * len(m.group(0)), text)


_OPENING_CALL = re.compile("<(" + "|".join(TOOL_TAGS) + ")>")


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
    """Content (stripped) of the LAST complete ``<answer>..</answer>`` outside result blocks and tool calls
    (an answer printed by code or a tool is not the model's final answer), else None."""
    visible = _blank_closed(_OPENING_CALL, _blank(_RESULT_TO_END, text))
    end = visible.rfind("</answer>")
    begin = visible.rfind("<answer>", 0, end) if end >= 0 else -1
    if begin < 0:
        return None
    return text[begin + len("<answer>"):end].strip()


_STRUCTURE_TAGS = ("think", "answer", "result")


def check_format(response: str, tool_tags=TOOL_TAGS) -> tuple[bool, str]:
    """Check the tag structure of a whole response -> (ok, reason); reason is "" when ok.

    Well formed: any sequence of free text, ``<think>..</think>`` blocks and tool calls, where each tool call
    is followed (only whitespace between) by a closed ``<result>..</result>`` block; then exactly one
    ``<answer>..</answer>`` with only whitespace after it. No nesting (no tag inside think/answer), no
    unclosed tag, no stray closing tag, no result block without a call.
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
    """Index of the ``</tag>`` that closes a call whose body starts at ``body_start`` (string rule above)."""
    closing = f"</{tag}>"
    if tag != "python":
        end = text.find(closing, body_start)
        return end if end >= 0 else None
    position, end = body_start, -1
    while True:
        if end < position:
            end = text.find(closing, position)
            if end < 0:
                return None
        token = _CODE_TOKEN.search(text, position, end)
        if token is None:
            return end
        if token.group().startswith("#"):
            position = token.end()
            continue
        closed = _STRING_END[token.group()].match(text, token.end())
        if closed is None:
            return None  # a string that never closes: every later closing tag is inside it
        position = closed.end()


_STRUCTURE_OR_TOOL_TAG = re.compile(r"<(\s*/?\s*(?:think|answer|result|python|search|calculator)\b)",
                                    re.IGNORECASE)


def escape_tool_output(text: str, tags=()) -> str:
    """``text`` (a tool's output) with the ``<`` of anything that could read as a tag written ``&lt;``: the
    structure tags (think, answer, result), the tool tags and ``tags`` (extra tag names), in any letter case,
    with or without a slash or spaces. Every other character is kept, so ``x < 3`` or ``<class 'int'>`` read
    as before. After this a tool's output can neither close its own result block nor open an answer."""
    if not isinstance(text, str):
        raise ValueError(f"text: expected a string, got {type(text).__name__}")
    pattern = _STRUCTURE_OR_TOOL_TAG
    extra = [t for t in tags if t.lower() not in (*_STRUCTURE_TAGS, *TOOL_TAGS)]
    if extra:
        names = "|".join(re.escape(t) for t in (*_STRUCTURE_TAGS, *TOOL_TAGS, *extra))
        pattern = re.compile(rf"<(\s*/?\s*(?:{names})\b)", re.IGNORECASE)
    return pattern.sub(r"&lt;\1", text)
