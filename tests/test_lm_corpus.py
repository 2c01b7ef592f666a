"""rbkd.lm.corpus (finding, splitting and hashing a text folder) and rbkd.lm.tokenizer (the BPE)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from lm_fixtures import write_tiny_corpus

from rbkd.lm import corpus as corpus_mod
from rbkd.lm.corpus import CorpusError, file_split, find_corpus, load_corpus
from rbkd.lm.tokenizer import EOS_TOKEN, load_tokenizer, tokenizer_for, train_tokenizer


@pytest.fixture
def texts(tmp_path) -> Path:
    return write_tiny_corpus(tmp_path / "texts")


def _sha(root: Path, files: list[str]) -> str:
    """The documented corpus hash, written out independently."""
    h = hashlib.sha256()
    for rel in files:
        data = (root / rel).read_bytes()
        h.update(rel.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def test_a_text_folder_is_listed_sorted_split_by_file_and_hashed(texts):
    c = load_corpus(texts)
    assert len(c.files) == 24 and list(c.files) == sorted(c.files)
    assert ".hidden.txt" not in c.files and not any(f.endswith(".bin") for f in c.files)
    assert {f.rsplit(".", 1)[-1] for f in c.files} == {"txt", "md"}
    assert set(c.splits["train"]) | set(c.splits["validation"]) == set(c.files)
    assert not set(c.splits["train"]) & set(c.splits["validation"])
    assert c.splits["validation"], "a corpus of 2+ files always has a validation file"
    assert c.sha256 == _sha(texts, list(c.files))
    assert c.num_bytes == sum((texts / f).stat().st_size for f in c.files)
    docs = list(c.documents("validation"))
    assert [rel for rel, _ in docs] == list(c.splits["validation"])
    assert docs[0][1] == (texts / docs[0][0]).read_text()


def test_the_split_rule_is_the_documented_hash_of_the_path():
    for rel in ("library/os.rst.txt", "a.md", "tutorial/index.rst.txt", "x/y/z.txt"):
        h = int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16)
        assert file_split(rel) == ("validation" if h % 20 == 0 else "train")
    names = [f"f{i}.txt" for i in range(2000)]
    share = sum(file_split(n) == "validation" for n in names) / len(names)
    assert 0.03 < share < 0.07  # about 1 in 20


def test_the_hash_changes_with_a_byte_or_a_name_and_the_split_does_not_move(texts):
    before = load_corpus(texts)
    f = texts / before.files[0]
    f.write_bytes(f.read_bytes() + b"!")
    edited = load_corpus(texts)
    assert edited.sha256 != before.sha256 and edited.splits == before.splits
    f.rename(f.with_name("renamed.txt"))
    assert load_corpus(texts).sha256 not in (before.sha256, edited.sha256)


def test_undecodable_bytes_are_replaced_not_fatal(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 ok\n")
    (tmp_path / "b.txt").write_bytes(b"plain\n")
    c = load_corpus(tmp_path)
    texts = dict(c.documents("train")) | dict(c.documents("validation"))
    assert texts["a.txt"] == "caf\ufffd ok\n"


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: p, "is empty"),  # a folder without text files
        (lambda p: p / "absent", "is not a folder"),
    ],
)
def test_a_bad_corpus_folder_is_one_line(tmp_path, make, words):
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(CorpusError, match=words) as e:
        load_corpus(make(tmp_path))
    assert "\n" not in str(e.value)


def test_a_corpus_of_empty_files_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(CorpusError, match="hold no bytes"):
        load_corpus(tmp_path)


def test_the_default_corpus_is_found_in_rbkd_data_then_debian(tmp_path, monkeypatch, texts):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(corpus_mod, "DEBIAN_PYDOCS", tmp_path / "no-debian")
    monkeypatch.delenv("RBKD_DATA", raising=False)
    with pytest.raises(CorpusError, match="apt-get install python3.11-doc") as e:
        find_corpus()
    assert "\n" not in str(e.value)
    monkeypatch.setattr(corpus_mod, "DEBIAN_PYDOCS", texts)
    assert find_corpus() == texts
    data = tmp_path / "data"
    write_tiny_corpus(data / "pydocs", files=3)
    monkeypatch.setenv("RBKD_DATA", str(data))
    assert find_corpus() == data / "pydocs"
    assert find_corpus(texts) == texts  # --corpus wins, and is the only place looked in


@pytest.mark.skipif(not corpus_mod.DEBIAN_PYDOCS.is_dir(), reason="python3.11-doc not installed")
def test_pydocs_has_its_497_files_and_the_documented_split():
    c = load_corpus(corpus_mod.DEBIAN_PYDOCS)
    assert len(c.files) == 497 and all(f.endswith(".rst.txt") for f in c.files)
    assert (len(c.splits["train"]), len(c.splits["validation"])) == (475, 22)


# ------------------------------------------------------------------ tokenizer


def test_the_bpe_trains_on_the_train_split_deterministically_and_saves_its_hash(texts, tmp_path):
    c = load_corpus(texts)
    a = train_tokenizer(c, 300, out=tmp_path / "a" / "tokenizer.json")
    b = train_tokenizer(c, 300)
    assert a.sha256 == b.sha256 == hashlib.sha256(a.path.read_bytes()).hexdigest()
    assert a.vocab_size == 300 and a.tokenizer.id_to_token(a.eos_id) == EOS_TOKEN
    loaded = load_tokenizer(a.path.parent)  # a folder holding tokenizer.json works too
    assert loaded.sha256 == a.sha256 and loaded.eos_id == a.eos_id
    for _, text in c.documents("validation"):  # byte-level: every text round-trips
        ids = loaded.encode(text)
        assert loaded.decode(ids) == text and len(ids) < len(text)  # merges were learnt


def test_validation_text_never_shapes_the_vocabulary(texts):
    c = load_corpus(texts)
    before = train_tokenizer(c, 300).sha256
    for rel in c.splits["validation"]:
        (texts / rel).write_text("zqxj " * 500)  # would be a merge if it were trained on
    assert train_tokenizer(load_corpus(texts), 300).sha256 == before


def test_tokenizer_for_trains_once_into_the_cache(texts, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    c = load_corpus(texts)
    first = tokenizer_for(c, 300)
    assert first.path.is_file() and str(tmp_path / "cache") in str(first.path)
    stamp = first.path.stat().st_mtime_ns
    assert tokenizer_for(c, 300).sha256 == first.sha256
    assert first.path.stat().st_mtime_ns == stamp  # reused, not trained again


@pytest.mark.parametrize(
    "content, words",
    [
        (b"{not json", "not a readable tokenizer.json"),
        (b'{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],'
         b'"normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":null,'
         b'"model":{"type":"WordLevel","vocab":{"a":0},"unk_token":"a"}}', "no special token"),
    ],
)  # fmt: skip
def test_a_bad_tokenizer_file_is_one_line(tmp_path, content, words):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=words) as e:
        load_tokenizer(path)
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")


def test_a_too_small_vocabulary_is_refused(texts):
    with pytest.raises(ValueError, match="vocab_size must be an int >= 257"):
        train_tokenizer(load_corpus(texts), 100)


def test_rbkd_data_list_names_the_corpus(tmp_path, monkeypatch, texts):
    import json

    from rbkd.cli.app import app
    from typer.testing import CliRunner

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("RBKD_DATA", raising=False)
    monkeypatch.setattr(corpus_mod, "DEBIAN_PYDOCS", texts)
    result = CliRunner().invoke(app, ["data", "list", "--json"])
    assert result.exit_code == 0, result.output
    (found,) = json.loads(result.stdout)["corpora"]
    c = load_corpus(texts)
    assert found["location"] == str(texts) and found["sha256"] == c.sha256
    assert found["split_files"] == {"train": len(c.splits["train"]), "validation": 1}
    monkeypatch.setattr(corpus_mod, "DEBIAN_PYDOCS", tmp_path / "none")
    result = CliRunner().invoke(app, ["data", "list"], terminal_width=200)
    assert result.exit_code == 0 and "apt-get install python3.11-doc" in result.stdout


def test_rbkd_lm_tokenize_reports_both_splits_and_reuses_them(tmp_path, monkeypatch, texts):
    import json

    from rbkd.cli.app import app
    from typer.testing import CliRunner

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    args = ["lm", "tokenize", "--corpus", str(texts), "--vocab-size", "300", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    c = load_corpus(texts)
    assert report["corpus_sha256"] == c.sha256 and report["vocab_size"] == 300
    for split in ("train", "validation"):
        row = report["splits"][split]
        assert row["files"] == len(c.splits[split]) and row["tokens"] > row["files"]
        chars = sum(len(t) for _, t in c.documents(split))
        assert row["chars_per_token"] == chars / (row["tokens"] - row["files"])  # EOS not counted
    again = json.loads(CliRunner().invoke(app, args).stdout)
    assert again["tokenizer_sha256"] == report["tokenizer_sha256"]
    bad = CliRunner().invoke(app, ["lm", "tokenize", "--corpus", str(tmp_path / "none")])
    assert bad.exit_code in (1, 2) and "Error:" in bad.output and "Traceback" not in bad.output
