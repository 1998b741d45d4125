"""Tool-call parsing, answer extraction and format checking on the edge cases the rollout engine meets."""

import pytest

from appo.tasks.parsing import check_format, escape_tool_output, extract_answer, find_tool_call


class TestFindToolCall:
    def test_single_call(self):
        text = "<think>add</think>\n<python>print(1 + 1)</python>"
        assert find_tool_call(text) == ("python", "print(1 + 1)")

    def test_unclosed_call_is_no_call(self):
        assert find_tool_call("Let me compute. <python>print(1 + 1)") is None
        assert find_tool_call("no tags at all") is None

    def test_first_of_several_calls_by_closing_tag(self):
        text = "<search>first query</search> then <python>x = 2</python>"
        assert find_tool_call(text) == ("search", "first query")
        assert find_tool_call("<python>a</python><python>b</python>") == ("python", "a")

    def test_only_requested_tags(self):
        text = "<search>q</search><python>1</python>"
        assert find_tool_call(text, tags=("python",)) == ("python", "1")
        assert find_tool_call(text, tags="search") == ("search", "q")

    def test_closing_tag_inside_a_python_string_is_code(self):
        text = '<python>s = "</python>"\nprint(len(s))</python> trailing'
        assert find_tool_call(text) == ("python", 's = "</python>"\nprint(len(s))')
        triple = "<python>doc = '''\n</python>\n'''\nprint(doc)</python>"
        assert find_tool_call(triple) == ("python", "doc = '''\n</python>\n'''\nprint(doc)")

    def test_opening_tag_inside_a_python_string(self):
        text = '<python>tag = "<python>"\nprint(tag)</python>'
        assert find_tool_call(text) == ("python", 'tag = "<python>"\nprint(tag)')

    def test_tag_mentioned_before_the_real_call(self):
        text = "<think>I will use <python> to add.</think><python>print(2)</python>"
        assert find_tool_call(text) == ("python", "print(2)")

    def test_stray_closing_tag_is_skipped(self):
        assert find_tool_call("oops</python> <search>q</search>") == ("search", "q")

    def test_a_string_that_never_closes_means_the_call_is_incomplete(self):
        assert find_tool_call('<python>print("</python>') is None

    def test_calls_inside_result_blocks_are_ignored(self):
        text = "<result>example: <search>inner</search></result><search>outer</search>"
        assert find_tool_call(text) == ("search", "outer")

    def test_empty_tags_raise(self):
        with pytest.raises(ValueError, match="tags"):
            find_tool_call("<python>1</python>", tags=())


class TestExtractAnswer:
    def test_last_complete_answer(self):
        assert extract_answer("<answer> 41 </answer> wait <answer>42</answer>") == "42"
        assert extract_answer("<answer>41</answer> <answer>42") == "41"  # the last COMPLETE one

    def test_none_without_answer(self):
        assert extract_answer("the answer is 42") is None
        assert extract_answer("<answer>42") is None

    def test_answers_printed_by_tools_do_not_count(self):
        text = "<python>print('<answer>7</answer>')</python><result><answer>7</answer></result>"
        assert extract_answer(text) is None
        assert extract_answer(text + "<answer>8</answer>") == "8"
        assert extract_answer("<answer>1</answer><result>cut off <answer>2</answer>") == "1"


GOOD = ("<think>Compute it.</think>\n<python>print(6 * 7)</python>\n<result>\n42\n</result>\n"
        "So the result is 42.\n<answer>42</answer>\n")


class TestCheckFormat:
    def test_well_formed(self):
        assert check_format(GOOD) == (True, "")
        assert check_format("<answer>5</answer>") == (True, "")
        two_calls = ("<search>a</search><result>x</result><search>b</search> <result>y</result>"
                     "<answer>b</answer>")
        assert check_format(two_calls) == (True, "")

    def test_result_block_may_contain_tags(self):
        assert check_format("<python>print('</think><answer>')</python><result></think><answer></result>"
                            "<answer>x</answer>") == (True, "")

    def test_python_string_with_closing_tag(self):
        text = '<python>print("</python>")</python><result></python></result><answer>1</answer>'
        assert check_format(text) == (True, "")

    @pytest.mark.parametrize("response, reason", [
        (GOOD + "extra words", "text after </answer>"),
        ("<answer>1</answer><answer>2</answer>", "<answer> after </answer>"),
        ("<think>hmm", "unclosed <think>"),
        ("<python>print(1)", "unclosed <python>"),
        ("<python>print(1)</python><answer>1</answer>", "<python> call not followed by <result>"),
        ("<python>print(1)</python>", "<python> call not followed by <result>"),
        ("<python>1</python> text <result>1</result><answer>1</answer>",
         "<result> block without a tool call"),
        ("<result>1</result><answer>1</answer>", "<result> block without a tool call"),
        ("<python>1</python><result>1<answer>1</answer>", "unclosed <result>"),
        ("<think>x <answer>1</answer></think><answer>1</answer>", "tag <answer> inside <think>"),
        ("</think><answer>1</answer>", "stray </think>"),
        ("just text", "no <answer>"),
        ("<answer>1", "unclosed <answer>"),
    ])
    def test_malformed(self, response, reason):
        ok, why = check_format(response)
        assert not ok
        assert why.startswith(reason), why


class TestEscapeToolOutput:
    def test_tags_in_any_case_or_spacing_are_neutralised(self):
        text = "x </result>\n<answer>42</answer> < / RESULT > <Search>q</search> <THINK>"
        escaped = escape_tool_output(text)
        assert escaped == ("x &lt;/result>\n&lt;answer>42&lt;/answer> &lt; / RESULT > &lt;Search>q&lt;/search> "
                           "&lt;THINK>")
        block = f"<python>1</python><result>\n{escaped}\n</result>\n"
        assert extract_answer(block) is None and check_format(block) == (False, "no <answer>")

    def test_other_text_is_kept(self):
        text = "x < 3 and y <= 4; <class 'int'>; a<b; <resultant>; 'results'; <pythonic>"
        assert escape_tool_output(text) == text  # a tag name must end where the word ends

    def test_extra_tags(self):
        assert escape_tool_output("</sql> </python>", tags=["sql"]) == "&lt;/sql> &lt;/python>"
        with pytest.raises(ValueError, match="text"):
            escape_tool_output(None)


class TestStringRuleWithoutCompiling:
    def test_comments_and_escapes(self):
        assert find_tool_call("<python>x = 1  # </python> ends here</python>") == ("python", "x = 1  # ")
        assert find_tool_call("<python>s = 'it\\'s </python>'\nprint(s)</python>") == \
            ("python", "s = 'it\\'s </python>'\nprint(s)")
        assert find_tool_call('<python>s = """a\n</python>\n"""</python>') == \
            ("python", 's = """a\n</python>\n"""')

    def test_a_string_broken_by_a_newline_never_closes_the_call(self):
        assert check_format("<python>s = 'abc\nprint(1)</python><result>1</result><answer>1</answer>") == \
            (False, "unclosed <python>")

    def test_a_string_still_open_keeps_later_tags_until_it_closes(self):
        # decided left to right only (as the engine decides while decoding): later text changes nothing before
        assert find_tool_call('<python>x = "<python>print(1)</python>') is None
        closed = '<python>x = "<python>print(1)</python>"\nprint(x)</python>'
        assert find_tool_call(closed) == ("python", 'x = "<python>print(1)</python>"\nprint(x)')

    def test_a_one_line_string_broken_by_a_newline_voids_the_call(self):
        assert find_tool_call("<python>s = 'abc\nprint(1)</python>") is None
        assert find_tool_call("<python>s = 'abc\n<python>print(1)</python>") == ("python", "print(1)")


class TestOneClosingTagRule:
    """The engine decides as each token arrives (closing_tag_counts on the turn so far); the parser and the
    reward read the finished text. Both must find the same boundaries."""

    SNIPPETS = ('print("</python>")', "s = '</answer>'  # </search>", 'x = """\n</python>\n"""',
                "# </answer>", "t = 'it\\'s </python>'", "s = 'broken\n", 'u = "<python>"', "x = 1",
                "</answer>", "<answer>4", "</search>", "<search>q", "'''", '"', "#", "\n", "<result>",
                "</result>", "</python>", "<python>")

    def texts(self, count=400, seed=0):
        import random

        rng = random.Random(seed)
        for _ in range(count):
            yield "".join(rng.choice(self.SNIPPETS) for _ in range(rng.randint(1, 8)))

    def test_a_prefix_decides(self):
        from appo.tasks.parsing import closing_tag_counts

        for text in self.texts():
            for tag in ("</python>", "</answer>", "</search>"):
                at = text.find(tag)
                while at >= 0:
                    end = at + len(tag)
                    assert closing_tag_counts(text, at) == closing_tag_counts(text[:end], at), (text, at)
                    at = text.find(tag, at + 1)

    def test_the_engine_s_first_counted_closing_is_the_parser_s_call(self):
        from appo.tasks.parsing import closing_tag_counts, tool_call_span

        for text in self.texts(seed=1):
            events = sorted((i, t) for t in ("python", "search") for i in self._finds(text, f"</{t}>"))
            for at, tag in events:
                prefix = text[:at + len(tag) + 3]
                if not closing_tag_counts(prefix, at):
                    continue
                span = tool_call_span(prefix, (tag,))  # what the engine runs when this tag stops the turn
                assert span is None or span[2] == at, (text, at)
                if span is not None:
                    assert tool_call_span(text, (tag,))[2] == at, text  # and the parser on the whole text
                break

    @staticmethod
    def _finds(text, tag):
        at = text.find(tag)
        while at >= 0:
            yield at
            at = text.find(tag, at + 1)

    def test_closing_tags_in_strings_and_comments(self):
        from appo.tasks.parsing import closing_tag_counts

        code = '<python>s = "</python>"  # </answer>\nprint(s)</python><answer>1</answer>'
        counted = [closing_tag_counts(code, i) for i in self._finds(code, "</")]
        assert counted == [False, False, True, True]
        assert closing_tag_counts("<python>x = 1  # </python>", 17)  # a comment never hides </python>
        assert closing_tag_counts("x = '</answer>'", 5)  # no python call: plain text

    def test_answers_in_code_do_not_count_even_in_an_unfinished_call(self):
        assert extract_answer('<python>print("</python><answer>42</answer>")</python>') is None
        assert extract_answer("<python>s = '<answer>42</answer>'") is None
        assert extract_answer("<python>x = 1\n</python><result></result><answer>42</answer>") == "42"

    def test_result_blocks_are_cut_out_of_the_answer(self):
        assert extract_answer("<answer>4<result>2</result></answer>") == "4"
        assert extract_answer("<answer><result>42</result> </answer>") == ""
        assert extract_answer("<answer>4</answer><result>2</result>") == "4"
