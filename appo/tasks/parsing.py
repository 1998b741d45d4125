"""Reading the tag structure of agent text: tool calls, the final answer, and format checking.

Tags: ``<think>..</think>`` (optional reasoning), tool calls ``<python>..</python>``, ``<search>..</search>``,
``<calculator>..</calculator>``, each answered by a ``<result>..</result>`` block the environment appends, and
one final ``<answer>..</answer>``. Result blocks are opaque: tags printed by a tool do not count.

Closing-tag rule for tool calls: a call ends at its first closing tag, except that for ``python`` a
``</python>`` that falls inside a string literal of the code so far (the code up to it fails to compile with
"unterminated string") is part of the code. A call's opening tag is the nearest ``<tag>`` before its closing
tag (so a tag merely mentioned earlier, e.g. inside <think>, is skipped), again skipping an opening tag that
sits inside a string of the code.
"""

from __future__ import annotations

import re
import textwrap

TOOL_TAGS = ("python", "search", "calculator")
_CLOSED_RESULT = re.compile(r"<result>.*?</result>", re.DOTALL)
_RESULT_TO_END = re.compile(r"<result>.*?(?:</result>|\Z)", re.DOTALL)  # an unclosed block runs to the end


def find_tool_call(text: str, tags=TOOL_TAGS) -> tuple[str, str] | None:
    """The FIRST complete tool call in ``text`` (one turn of model text) -> (tag, body), or None.

    "First" is by closing tag: the engine stops generating at a closing tag, so that call is the one it runs.
    Later calls in the same text are ignored (the engine cuts the turn after the first call and appends its
    result). An opening tag without its closing tag is no call (None: keep generating). The body is the raw
    text between the tags (no stripping).
    """
    tags = (tags,) if isinstance(tags, str) else tuple(tags)
    if not tags:
        raise ValueError("tags: need at least one tool tag")
    closing = re.compile("</(" + "|".join(re.escape(t) for t in tags) + ")>")
    visible = _blank(_CLOSED_RESULT, text)
    for match in closing.finditer(visible):
        tag = match.group(1)
        begin = _opening_before(visible, tag, match.start())
        if begin is not None:
            return tag, text[begin:match.start()]
    return None


def _opening_before(visible: str, tag: str, end: int) -> int | None:
    """Start of the body of a ``tag`` call closed at ``end``: the nearest opening tag whose body is not cut
    inside a string literal (python only); None when there is none."""
    opening = f"<{tag}>"
    begin = visible.rfind(opening, 0, end)
    while begin >= 0:
        body_start = begin + len(opening)
        if tag != "python" or not _ends_inside_string(visible[body_start:end]):
            return body_start
        begin = visible.rfind(opening, 0, begin)
    return None


def _ends_inside_string(code: str) -> bool:
    """True when ``code`` fails to compile because a string literal is still open at its end."""
    try:
        compile(textwrap.dedent(code), "<tool call>", "exec")
    except SyntaxError as error:
        message = str(error.msg)
        return "unterminated" in message or "EOF while scanning" in message
    except ValueError:  # null bytes
        return False
    return False


def _blank(pattern: re.Pattern, text: str) -> str:
    """``text`` with every match of ``pattern`` replaced by as many spaces (positions unchanged)."""
    return pattern.sub(lambda m: " " * len(m.group(0)), text)


_CLOSED_CALL = re.compile("<(" + "|".join(TOOL_TAGS) + r")>.*?</\1>", re.DOTALL)


def extract_answer(text: str) -> str | None:
    """Content (stripped) of the LAST complete ``<answer>..</answer>`` outside result blocks and tool calls
    (an answer printed by code or a tool is not the model's final answer), else None."""
    visible = _blank(_CLOSED_CALL, _blank(_RESULT_TO_END, text))
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
    end = text.find(closing, body_start)
    while end >= 0:
        if tag != "python" or not _ends_inside_string(text[body_start:end]):
            return end
        end = text.find(closing, end + 1)
    return None
