"""Text sources, Gutenberg stripping and windows (the BOS rule)."""

from __future__ import annotations

import pytest

from probes.corpus import (
    Document,
    make_windows,
    read_text,
    shakespeare_plays,
    strip_gutenberg,
)
from probes.errors import InvalidOptionError, TextSourceError


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_strip_gutenberg_header_and_footer():
    raw = ("The Project Gutenberg EBook of Hamlet\nlicence...\n"
           "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nACT I.\nWho's there?\n"
           "End of the Project Gutenberg EBook of Hamlet\nmore licence text")
    assert strip_gutenberg(raw) == "ACT I.\nWho's there?"


def test_strip_gutenberg_leaves_plain_text():
    assert strip_gutenberg("  Just a play.  ") == "Just a play."


def test_shakespeare_hamlet_is_read_and_clean():
    (doc,) = read_text("shakespeare:hamlet")
    assert doc.text.startswith("HAMLET, PRINCE OF DENMARK")
    assert "Gutenberg" not in doc.text and len(doc.text) > 100_000
    assert "hamlet_f" in shakespeare_plays()


def test_unknown_play_suggests():
    with pytest.raises(TextSourceError, match="did you mean hamlet"):
        read_text("shakespeare:hamlett")


def test_files_and_folders(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "skip.md").write_text("no", encoding="utf-8")
    assert [d.text for d in read_text(str(tmp_path))] == ["first", "second"]
    assert read_text(str(tmp_path / "a.txt"))[0].name == "a.txt"
    with pytest.raises(TextSourceError, match="does not exist"):
        read_text(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TextSourceError, match=r"no \.txt files"):
        read_text(str(empty))
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(TextSourceError, match="not UTF-8"):
        read_text(str(tmp_path / "bad.txt"))


def test_unknown_source_and_offline_hub():
    with pytest.raises(TextSourceError, match="unknown text source"):
        read_text("nonsense")
    with pytest.raises(TextSourceError, match="form is hf"):
        read_text("hf:onlyname")
    with pytest.raises(TextSourceError, match="could not open the dataset"):
        read_text("hf:some/dataset:train:text")


def test_windows_with_bos_take_one_place():
    ws = make_windows([Document("d", "abcdefghij")], chars, window=4, bos_token_id=0)
    assert [len(w) for w in ws] == [3, 3, 3, 1]
    assert [w.start for w in ws] == [0, 3, 6, 9]
    assert ws[0].gold_next() == chars("bcd")
    assert ws[-1].next_token_id == -1  # end of the document


def test_windows_without_bos_and_caps():
    ws = make_windows([Document("d", "abcdefghij")], chars, window=4, bos_token_id=None,
                      max_tokens=6)
    assert [len(w) for w in ws] == [4, 2]
    assert ws[-1].next_token_id == ord("g")  # the gold token beyond the cap is kept


def test_windows_never_cross_documents():
    docs = [Document("a", "abc"), Document("b", "defg")]
    ws = make_windows(docs, chars, window=10, bos_token_id=1)
    assert [(w.document, len(w)) for w in ws] == [("a", 3), ("b", 4)]
    assert [w.window_id for w in ws] == [0, 1]


def test_window_errors():
    with pytest.raises(InvalidOptionError):
        make_windows([Document("d", "abc")], chars, window=1)
    with pytest.raises(InvalidOptionError):
        make_windows([Document("d", "abc")], chars, window=4, max_tokens=0)
    with pytest.raises(TextSourceError, match="at least 2"):
        make_windows([Document("d", "a")], chars, window=4)
    with pytest.raises(TextSourceError, match="0 tokens"):
        make_windows([Document("d", "   ")], chars, window=4)
