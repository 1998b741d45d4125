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

    def test_an_opening_inside_an_unterminated_string_starts_the_call(self):
        assert find_tool_call('<python>x = "<python>print(1)</python>') == ("python", "print(1)")
