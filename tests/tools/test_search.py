"""BM25 search over the HotpotQA paragraphs finds the gold paragraphs; make_tools wires the tools by tag."""

import json
import time

import pytest

from appo.tasks import HotpotQA
from appo.tools import make_tools
from appo.tools.search import SearchTool, build_hotpotqa_corpus


@pytest.fixture(scope="module")
def corpus():
    return build_hotpotqa_corpus()


@pytest.fixture(scope="module")
def search(corpus):
    return SearchTool(corpus)


@pytest.mark.data  # the HotpotQA corpus: $APPO_DATA_DIR
def test_corpus_is_the_deduplicated_union_of_context_paragraphs(corpus):
    titles = [p["title"] for p in corpus]
    assert len(titles) == len(set(titles))
    assert 400 < len(corpus) <= 500  # 50 questions x 10 paragraphs, minus repeats
    wood = next(p for p in corpus if p["title"] == "Ed Wood")
    assert wood["text"].startswith("Edward Davis Wood Jr.")


@pytest.mark.data  # the HotpotQA corpus: $APPO_DATA_DIR
def test_gold_paragraph_in_top_3_for_most_questions(search):
    examples = HotpotQA().examples("dev")[:12]
    hits = 0
    for example in examples:
        titles = {p["title"] for p in search.search(example.question)}
        hits += bool(titles & set(example.meta["supporting_titles"]))
    assert hits >= 10, f"only {hits} of {len(examples)} questions found a gold paragraph"


@pytest.mark.data  # the HotpotQA corpus: $APPO_DATA_DIR
def test_run_formats_title_and_text(search):
    result = search.run("Scott Derrickson director")
    passages = result.split("\n\n")
    assert len(passages) == 3
    assert passages[0].startswith("Scott Derrickson: Scott Derrickson (born July 16, 1966)")
    assert all(len(p) <= search.max_passage_chars for p in passages)
    assert len(result) <= search.max_output_chars


@pytest.mark.data  # the HotpotQA corpus: $APPO_DATA_DIR
def test_unknown_words_and_empty_queries(search):
    assert search.run("zzqxv wvvvq") == "No results for 'zzqxv wvvvq'."
    assert search.run("   ") == "Error: empty search query"


def test_from_jsonl_and_k(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [{"title": "Alpha", "text": "the red fox jumps"}, {"title": "Beta", "text": "a blue whale swims"},
            {"title": "Gamma", "text": "red wine and red apples"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    tool = SearchTool.from_jsonl(path, k=1)
    assert tool.run("red apples") == "Gamma: red wine and red apples"
    assert [p["title"] for p in tool.search("red", k=3)] == ["Gamma", "Alpha"]  # zero-score Beta left out


def test_huge_queries_are_cut_and_never_echoed_whole():
    tool = SearchTool([{"title": "Alpha", "text": "the red fox jumps"}], max_query_chars=50)
    start = time.monotonic()
    result = tool.run("zzqxv " * 2_000_000)  # 12 MB
    assert time.monotonic() - start < 1.0
    assert result.startswith("No results for 'zzqxv") and len(result) < 120
    assert tool.run("x " * 1000 + " red") == "No results for '" + " ".join(["x"] * 25) + "'."
    assert tool.run("red" + " " * 10_000) == "Alpha: the red fox jumps"
    with pytest.raises(ValueError, match="max_query_chars"):
        SearchTool([{"title": "a", "text": "b"}], max_query_chars=0)


def test_bad_corpus_raises_value_error():
    with pytest.raises(ValueError, match="corpus"):
        SearchTool([])
    with pytest.raises(ValueError, match="corpus"):
        SearchTool([{"title": "x"}])


@pytest.mark.data  # the HotpotQA corpus: $APPO_DATA_DIR
def test_make_tools_keys_by_tag(corpus):
    tools = make_tools(["python", "calculator", "search"], python={"timeout_s": 3}, search={"corpus": corpus})
    assert sorted(tools) == ["calculator", "python", "search"]
    assert tools["python"].timeout_s == 3
    assert tools["calculator"].run("6 * 7") == "42"
    with pytest.raises(ValueError, match="names"):
        make_tools(["shell"])
    with pytest.raises(ValueError, match="options"):
        make_tools(["python"], search={})
