"""Tests of the data layer (trainlab.data and the modules it re-exports): tokenizer, corpora,
splits, cache, datasets, DataModules, fixtures."""
import ast, functools, importlib, json, multiprocessing, pickle, random, re, time, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

import trainlab.data as D
import trainlab.corpora
from trainlab.core import repo_root, stable_unit_hash
from trainlab.data import (CORPORA, ByteTokenizer, DocEvalDataModule, DocWindowDataset, Document, LMDataModule, PackedDataset,
                           TokenizedCorpus, balanced_val_mask, balanced_val_split, boundary_share, check_tokenizer, corpus_card,
                           corpus_checksum, load_corpus, load_documents, list_corpora, register_corpus, select_eval_docs, split_corpus,
                           split_documents, top_level_defs, val_split_stats, write_tiny_fixtures)

BUILTINS = ["stdlib_code", "stdlib_prose", "stdlib_tests", "unicode_names", "synthetic_facts", "stdlib_defs"]
TOK = ByteTokenizer()


@functools.lru_cache(maxsize=None)
def built(name):
    "Documents of a built-in corpus, built once per test session (stdlib_prose takes seconds)."
    return tuple(load_documents(name))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    "Every test caches into a private folder, never into the checkout's data/cache."
    monkeypatch.setenv("TRAINLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def temp_corpus():
    "Register a small seeded corpus that counts how often it is built; unregister afterwards."
    calls = []
    def build(seed):
        calls.append(seed); rng = random.Random(seed)
        return [Document(f"d{i:03d}", "".join(chr(97 + int(rng.random() * 26)) for _ in range(1 + int(rng.random() * 300))) + " é")
                for i in range(60)]
    register_corpus("_t_counter", build, "test corpus", "test")
    yield "_t_counter", calls
    CORPORA.pop("_t_counter", None)


# ---------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("text", ["", "hello", "naïve café", "日本語のテキスト", "emoji 🐍🚀 and \x00 nul", "tabs\tand\r\nnewlines"])
def test_byte_tokenizer_round_trip(text):
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text
    arr = TOK.encode_array(text)
    assert arr.dtype == np.uint16 and arr.tolist() == ids
    assert TOK.decode(torch.tensor(ids, dtype=torch.long)) == text
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))


def test_byte_tokenizer_invalid_bytes_and_specials():
    assert TOK.decode([0xff, 0xfe]) == "\ufffd\ufffd"
    assert TOK.decode([0xe6, 0x97]) == "\ufffd"                  # truncated multi-byte sequence
    assert TOK.decode([104, 256, 105, 257, 257]) == "h<|eot|>i"   # EOT marker, PAD dropped
    assert ByteTokenizer(eot_marker="\n").decode([97, 256, 98]) == "a\nb"
    with pytest.raises(ValueError, match="`ids`"): TOK.decode([258])
    with pytest.raises(ValueError, match="`ids`"): TOK.decode([-1])


def test_byte_lengths():
    bl = TOK.byte_lengths
    assert bl.shape == (TOK.vocab_size,) == (258,)
    assert bl[:256].eq(1).all() and bl[TOK.eot_id] == 1 and bl[TOK.pad_id] == 0
    text = "bits per byte: ½ → ∞ 🐍"
    assert int(bl[torch.tensor(TOK.encode(text))].sum()) == len(text.encode())


def test_check_tokenizer_rejects_incomplete():
    class Half: name, vocab_size = "half", 10
    with pytest.raises(TypeError, match="missing eot_id, pad_id, byte_lengths, encode, decode"): check_tokenizer(Half())
    class BadLen(ByteTokenizer):
        def __init__(self): super().__init__(); self.byte_lengths = torch.ones(3)
    with pytest.raises(ValueError, match="byte_lengths"): check_tokenizer(BadLen())
    assert check_tokenizer(TOK) is TOK


# ---------------------------------------------------------------- splits
def _docs(n=400):
    return [Document(f"doc/{i}.py", f"text {i}") for i in range(n)]


def test_split_depends_only_on_id():
    docs = _docs()
    tr, va = split_documents(docs, 0.1)
    assert len(tr) + len(va) == len(docs) and 15 < len(va) < 70
    val_ids = {d.id for d in va}
    shuffled = docs[:]; random.Random(1).shuffle(shuffled)
    sub = shuffled[:150] + [Document("new/extra.py", "x")]
    _, va2 = split_documents(sub, 0.1)
    assert {d.id for d in va2} - {"new/extra.py"} == val_ids & {d.id for d in sub}
    # the text does not matter, only the id
    _, va3 = split_documents([Document(d.id, "other") for d in docs], 0.1)
    assert {d.id for d in va3} == val_ids
    # growing val_frac only adds to val; a salt gives another split
    assert val_ids <= {d.id for d in split_documents(docs, 0.3)[1]}
    assert {d.id for d in split_documents(docs, 0.1, salt="s")[1]} != val_ids
    assert split_documents(docs, 0.0)[1] == []


def test_split_fixed_across_machines():
    # pinned decisions: the rule is SHA-256 of the id, never Python's per-process salted hash()
    pinned = {"chunk.py": True, "copyreg.py": True, "U+0000": True, "os.py": False, "json/decoder.py": False, "entity/0007": False}
    assert {i: D.is_val(i, 0.05) for i in pinned} == pinned
    assert abs(stable_unit_hash("os.py") - 0.850948727781281) < 1e-12


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.01, True, "0.1", float("nan"), None])
def test_val_frac_errors(bad):
    with pytest.raises(ValueError, match="`val_frac`"): split_documents(_docs(5), bad)
    with pytest.raises(ValueError, match="`val_frac`"): load_corpus("synthetic_facts", val_frac=bad)


# ---------------------------------------------------------------- built-in corpora
@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_corpus_builds_deterministically(name):
    assert name in list_corpora()
    a = load_documents(name)   # built here and (separately) in `built`: the two must agree
    b = list(built(name))
    assert len(a) > 0 and all(isinstance(d, Document) and d.text for d in a)
    assert len({d.id for d in a}) == len(a)
    assert corpus_checksum(a) == corpus_checksum(b)


def test_stdlib_code_contents():
    docs = built("stdlib_code")
    ids = [d.id for d in docs]
    assert ids == sorted(ids)
    for must in ("os.py", "json/decoder.py", "asyncio/events.py", "collections/__init__.py"): assert must in ids
    for i in ids:
        parts = Path(i).parts[:-1]
        assert not set(parts) & {"test", "tests", "idle_test", "site-packages"}, i
        assert not Path(i).name.startswith("_sysconfigdata_") and not i.startswith("config-"), i
    assert not any(i.startswith("test/") for i in ids)
    assert "pydoc_data/topics.py" not in ids   # generated; its text is stdlib_prose's


def test_stdlib_prose_and_tests_contents():
    prose = {d.id: d.text for d in built("stdlib_prose")}
    assert "pydoc_data/assert" in prose and "json/__init__.py" in prose
    assert all(len(t) >= D.MIN_PROSE_CHARS for i, t in prose.items() if not i.startswith("pydoc_data/"))
    assert "JSON" in prose["json/__init__.py"]
    tests = built("stdlib_tests")
    assert all(d.id.startswith("test/") for d in tests)
    assert "test/test_json/test_dump.py" in {d.id for d in tests}


def test_stdlib_tests_missing_suite_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "test").mkdir(); (tmp_path / "test" / "__init__.py").write_text("")
    monkeypatch.setattr(trainlab.corpora, "stdlib_dir", lambda: tmp_path)  # stdlib_tests looks here
    with pytest.raises(FileNotFoundError, match="test suite"): load_documents("stdlib_tests")


def test_top_level_defs():
    src = ("import functools\n"
           "def f(x): return x\n\n"
           "@functools.cache\n@staticmethod\ndef g(): pass\n"
           "class C:\n    def m(self): 'a method: part of C'\n"
           "if True:\n    def h(): 'nested in an if: skipped'\n"
           "async def f(): 'defined again'\n"
           "x = 1\n")
    defs = top_level_defs(src)
    assert [n for n, _ in defs] == ["f", "g", "C", "f#2"]
    assert dict(defs)["g"] == "@functools.cache\n@staticmethod\ndef g(): pass"
    assert dict(defs)["C"] == "class C:\n    def m(self): 'a method: part of C'"
    assert dict(defs)["f#2"] == "async def f(): 'defined again'"
    # form-feed lines (one line for ast, two for str.splitlines), \r\n, multi-byte end columns, trailing comments
    assert top_level_defs("\x0c\ndef π():\r\n    return 'é'  # note\n\x0c\n\x0c\ndef k(): pass") == [("π", "def π():\r\n    return 'é'"), ("k", "def k(): pass")]
    assert top_level_defs("x = 1\n") == []
    with pytest.raises(SyntaxError): top_level_defs("def broken(:\n")


def test_stdlib_defs_contents():
    docs = built("stdlib_defs")
    ids = [d.id for d in docs]
    assert len(ids) == len(set(ids)) > 1000                                 # unique ids, many documents
    code_ids = [d.id for d in built("stdlib_code")]
    files = [i.split("::")[0] for i in ids]
    assert set(files) <= set(code_ids)                                      # the files of stdlib_code, in its order
    assert files == sorted(files, key={c: k for k, c in enumerate(code_ids)}.__getitem__)
    for must in ("json/decoder.py::JSONDecoder", "bisect.py::insort_right", "os.py::walk"): assert must in ids
    lens = np.array([len(d.text.encode("utf-8")) for d in docs])
    assert lens.min() >= D.MIN_DEF_BYTES and np.median(lens) < 512        # short documents: median well under 1024 tokens
    assert sum(lens) > 1_000_000
    code = {d.id: d.text for d in built("stdlib_code")}
    for d in docs[::25]:                                                    # each one is a definition cut from its file
        text = d.text[:-1]
        assert d.text.endswith("\n") and text in code[d.id.split("::")[0]], d.id
        tree = ast.parse(d.text)
        assert len(tree.body) == 1 and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)), d.id
        assert tree.body[0].name == d.id.split("::")[1].split("#")[0]
    # rebuilt by hand for the first files: every top-level definition of at least MIN_DEF_BYTES, nothing else
    first = code_ids[:60]
    want = [f"{f}::{n}" for f in first for n, t in top_level_defs(code[f]) if len(t.encode("utf-8")) + 1 >= D.MIN_DEF_BYTES]
    assert [i for i in ids if i.split("::")[0] in set(first)] == want
    assert any(len(t.encode("utf-8")) + 1 < D.MIN_DEF_BYTES for f in first for _, t in top_level_defs(code[f]))  # some are dropped


def test_unicode_names_filters_generated_names():
    docs = built("unicode_names")
    text = "".join(d.text for d in docs)
    for fam in ("CJK UNIFIED IDEOGRAPH", "HANGUL SYLLABLE", "TANGUT IDEOGRAPH-", "TANGUT COMPONENT-", "NUSHU CHARACTER-",
                "KHITAN SMALL SCRIPT CHARACTER-", "CJK COMPATIBILITY IDEOGRAPH-"):
        assert fam not in text, fam
    assert "0041 LATIN CAPITAL LETTER A\n" in text and "HANGUL LETTER KIYEOK" in text
    assert docs[0].id == "U+0000" and all(d.id.startswith("U+") for d in docs)
    ids = [int(d.id[2:], 16) for d in docs]
    assert ids == sorted(ids) and all(i % 256 == 0 for i in ids)


def test_synthetic_facts_seeded():
    a, b, c = D.synthetic_facts(0, 30), D.synthetic_facts(0, 30), D.synthetic_facts(1, 30)
    assert a == b and a != c
    world = D.fact_world(0, 30)
    assert len({e["name"] for e in world}) == 30
    for e, d in zip(world, a):
        assert e["id"] == d.id and e["name"] in d.text and str(e["birth_year"]) in d.text and e["birthplace"] in d.text
    # the seed reaches the builder through load_corpus
    assert load_corpus("synthetic_facts", "all", seed=1).ids == [d.id for d in D.synthetic_facts(1)]
    assert load_corpus("synthetic_facts", "all", seed=1).tokens.tobytes() != load_corpus("synthetic_facts", "all", seed=0).tokens.tobytes()


# ---------------------------------------------------------------- user files
def test_user_folder_file_and_jsonl(tmp_path):
    root = tmp_path / "mydocs"
    (root / "sub" / "deeper").mkdir(parents=True); (root / ".hidden").mkdir(); (root / "__pycache__").mkdir()
    (root / "b.txt").write_text("bee\n"); (root / "a.md").write_text("# A\n")
    (root / "sub" / "c.py").write_text("print('c')\n"); (root / "sub" / "deeper" / "d.rst").write_text("dé\n")
    (root / "sub" / "noext").write_text("plain text without suffix")
    (root / "empty.txt").write_text("")
    (root / "bin.dat").write_bytes(bytes([0xff, 0xfe, 0x00, 0x01]))
    (root / ".hidden" / "x.txt").write_text("hidden"); (root / ".secret.txt").write_text("hidden")
    (root / "__pycache__" / "c.txt").write_text("cache")
    with pytest.warns(UserWarning, match="skipped 1 of 7 files that are not UTF-8 text: bin.dat"): docs = load_documents(root)
    assert [d.id for d in docs] == ["a.md", "b.txt", "sub/c.py", "sub/deeper/d.rst", "sub/noext"]
    assert docs[3].text == "dé\n"
    assert load_documents(str(root / "b.txt")) == [Document("b.txt", "bee\n")]

    jl = tmp_path / "data.jsonl"
    jl.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"id": "custom", "text": "second", "x": 1}) + "\n")
    assert load_documents(jl) == [Document("data.jsonl:1", "first"), Document("custom", "second")]
    bad = tmp_path / "bad.jsonl"; bad.write_text('{"text": "ok"}\n{"no_text": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"): load_documents(bad)
    dup = tmp_path / "dup.jsonl"; dup.write_text('{"id": "a", "text": "1"}\n{"id": "a", "text": "2"}\n')
    with pytest.raises(ValueError, match="unique"): load_documents(dup)
    binf = tmp_path / "b.bin"; binf.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="UTF-8"): load_documents(binf)

    with pytest.warns(UserWarning, match="bin.dat"): c = load_corpus(root, "all")
    assert c.ids == [d.id for d in docs] and TOK.decode(c.doc(3)) == "dé\n" and c.n_bytes == sum(len(d.text.encode()) for d in docs)



# ---------------------------------------------------------------- bad user input
def _gen_text(k, n=3):
    "Generated text for tiny user corpora (the synthetic-facts generator; nothing copied)."
    return "".join(d.text for d in D.synthetic_facts(seed=k, n_entities=n))


def test_folder_reports_files_that_are_not_utf8(tmp_path):
    root = tmp_path / "corpus"; root.mkdir()
    for k in range(4): (root / f"doc{k}.txt").write_text(_gen_text(k))
    (root / "a.bin").write_bytes(bytes(range(128, 256)))                  # invalid UTF-8
    (root / "b.dat").write_bytes("UTF-16 text".encode("utf-16"))          # NUL bytes
    with pytest.warns(UserWarning) as rec: docs = load_documents(root)
    assert [d.id for d in docs] == [f"doc{k}.txt" for k in range(4)]
    msgs = [str(w.message) for w in rec]
    assert msgs == [f"{root}: skipped 2 of 6 files that are not UTF-8 text: a.bin, b.dat"]
    # more than five: the first five names and how many more
    for k in range(5): (root / f"z{k}.bin").write_bytes(b"\xff" * (k + 1))
    with pytest.warns(UserWarning, match=r"skipped 7 of 11 files that are not UTF-8 text: a\.bin, b\.dat, z0\.bin, z1\.bin, z2\.bin, \.\.\. \(2 more\)"):
        load_documents(root)
    # a clean folder warns about nothing
    clean = tmp_path / "clean"; clean.mkdir(); (clean / "x.md").write_text(_gen_text(9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [d.id for d in load_documents(clean)] == ["x.md"]


def test_jsonl_errors_name_file_line_and_expectation(tmp_path):
    jl = tmp_path / "people.jsonl"
    good = "".join(json.dumps({"id": d.id, "text": d.text}) + "\n" for d in D.synthetic_facts(seed=2, n_entities=3))
    expected = 'expected a JSON object with a string "text" field'
    cases = [(good + '{"text": "no closing quote\n', "invalid JSON"),
             (good + "\n" + "not json at all\n", "invalid JSON"),
             (good + '["an", "array"]\n', "got an array"),
             (good + '{"body": "x", "id": "q"}\n', "got an object without \"text\" (its keys: 'body', 'id')"),
             (good + '{"text": 7}\n', 'got "text": a number'),
             (good + '{"text": null}\n', 'got "text": null')]
    for body, what in cases:
        jl.write_text(body)
        line = body.count("\n")      # the bad line is the last one
        with pytest.raises(ValueError) as e: load_documents(jl)
        msg = str(e.value)
        assert f"{jl}:{line}: " in msg and expected in msg and what in msg and "`source`" in msg, msg
    jl.write_bytes(good.encode() + b'{"text": "caf\xe9"}\n')                # Latin-1 byte on line 4
    with pytest.raises(ValueError, match=rf"{re.escape(str(jl))}:4: .* UTF-8, got the byte 0xe9 at column 14"): load_documents(jl)
    # line ends are only \n / \r\n: a raw U+2028 inside a JSON string stays in its document
    jl.write_text(json.dumps({"text": "one\u2028two"}, ensure_ascii=False) + "\r\n" + json.dumps({"text": "three"}) + "\r\n", newline="")
    assert [d.text for d in load_documents(jl)] == ["one\u2028two", "three"]
    assert [d.id for d in load_documents(jl)] == ["people.jsonl:1", "people.jsonl:2"]


def test_empty_inputs_say_they_are_empty(tmp_path):
    def empty_error(src):
        with pytest.raises(ValueError) as e: load_documents(src)
        msg = str(e.value)
        assert "is empty" in msg and repr(str(src)) in msg and "`source`" in msg, msg
        return msg
    f = tmp_path / "empty.txt"; f.write_text("")
    assert "found 0 bytes" in empty_error(f)
    folder = tmp_path / "folder"; folder.mkdir()
    assert "found no files" in empty_error(folder)
    (folder / ".hidden.txt").write_text(_gen_text(1)); (folder / "e.txt").write_text(""); (folder / "x.bin").write_bytes(b"\x00\x01")
    assert "found 2 file(s): 1 empty, 1 not UTF-8 text" in empty_error(folder)
    jl = tmp_path / "none.jsonl"; jl.write_text("")
    assert "found 0 bytes" in empty_error(jl)
    jl.write_text("\n   \n\n")
    assert "found only blank lines" in empty_error(jl)
    with pytest.raises(ValueError, match="is empty"): load_corpus(folder, "all")          # the same error through load_corpus
    with pytest.raises(ValueError, match="is empty"): LMDataModule(folder, seq_len=8, batch_size=1).setup()


def _small_folder(root, names):
    root.mkdir()
    for k, n in enumerate(names): (root / n).write_text(_gen_text(k, n=4) * 5)
    return root


def test_small_corpus_val_fallback(tmp_path):
    names = [f"part{k}.txt" for k in range(6)]
    assert not any(D.is_val(n, 0.05) for n in names)     # the hash rule alone gives no validation document
    first = min(names, key=stable_unit_hash)
    root = _small_folder(tmp_path / "six", names)
    with pytest.warns(UserWarning, match=rf"val_frac=0.05 put none of the 6 documents .* {re.escape(repr(first))}.*small-corpus fallback"):
        va = load_corpus(root, "val")
    with pytest.warns(UserWarning, match="small-corpus fallback"): tr = load_corpus(root, "train")
    full = load_corpus(root, "all")
    assert va.ids == [first] and sorted(tr.ids + va.ids) == sorted(names) and tr.n_tokens + va.n_tokens == full.n_tokens
    with pytest.warns(UserWarning, match="small-corpus fallback"):
        dm = LMDataModule(root, seq_len=32, batch_size=2); dm.setup()
    assert dm.val_corpus.ids == [first] and dm.train_corpus.ids == tr.ids and len(dm.val_dataloader()) > 0
    with pytest.warns(UserWarning, match="small-corpus fallback"):
        assert [d.id for d in split_documents(load_documents(root), 0.05)[1]] == [first]
    card = corpus_card(root)                             # the card's numbers follow the same split, quietly
    assert card["splits"]["val"]["docs"] == 1
    # deterministic: does not depend on the order of the ids; val_frac=0 means no validation split and no fallback
    with pytest.warns(UserWarning, match="small-corpus fallback"):
        assert D.val_mask(names[::-1]).tolist() == [n == first for n in names[::-1]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_corpus(root, "val", val_frac=0.0).ids == [] and len(load_corpus(root, "train", val_frac=0.0)) == 6
        assert D.val_mask(names, 0.05, fallback=False).sum() == 0


@pytest.mark.parametrize("fname,hash_says_val", [("only.txt", True), ("single.txt", False)])
def test_single_document_cannot_be_split(tmp_path, fname, hash_says_val):
    f = tmp_path / fname; f.write_text(_gen_text(3))
    assert D.is_val(fname, 0.05) == hash_says_val           # either way one side of the split would be empty
    assert len(load_corpus(f, "all")) == 1                  # loading it whole is fine
    for split in ("train", "val"):
        with pytest.raises(ValueError, match=rf"`val_frac`: a validation split \(val_frac=0.05\) needs at least 2 documents, got 1 \('{re.escape(fname)}'\)"):
            load_corpus(f, split)
    with pytest.raises(ValueError, match="`val_frac`.*at least 2 documents"): LMDataModule(f, seq_len=8, batch_size=1).setup()
    assert len(load_corpus(f, "train", val_frac=0.0)) == 1 and len(load_corpus(f, "val", val_frac=0.0)) == 0


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_splits_unchanged_by_fallback(name):
    ids = [d.id for d in built(name)]
    rule = np.array([D.is_val(i, 0.05) for i in ids])
    assert rule.sum() >= 1                                # the hash rule already gives validation documents ...
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # ... so no fallback, no warning, the same split
        assert np.array_equal(D.val_mask(ids, 0.05), rule)


def test_unknown_source_lists_corpora(tmp_path):
    for bad in ("no_such_corpus", tmp_path / "missing", str(tmp_path / "missing.jsonl")):
        with pytest.raises(ValueError) as e: load_corpus(bad)
        for n in BUILTINS: assert n in str(e.value)
    with pytest.raises(ValueError, match="`split`"): load_corpus("synthetic_facts", split="test")


def test_register_corpus_validation():
    with pytest.raises(ValueError, match="`name`"): register_corpus("a/b", lambda s: [])
    with pytest.raises(TypeError, match="`fn`"): register_corpus("ok_name", "not callable")
    register_corpus("_t_bad", lambda seed: ["not a document"])
    try:
        with pytest.raises(TypeError): load_documents("_t_bad")
    finally: CORPORA.pop("_t_bad")


# ---------------------------------------------------------------- TokenizedCorpus
def test_tokenized_corpus_basics():
    docs = [Document("x", "héllo"), Document("y", ""), Document("z", "abc")]
    c = TokenizedCorpus.from_documents(docs)
    assert len(c) == 3 and c.n_tokens == 9 and c.n_bytes == 9 and c.lengths.tolist() == [6, 0, 3]
    assert c.tokens.dtype == np.uint16 and c.offsets.dtype == np.int64 and c.offsets.tolist() == [0, 6, 6, 9]
    assert TOK.decode(c.doc(0)) == "héllo" and c.doc(1).size == 0
    s = c.subset([2, 0])
    assert s.ids == ["z", "x"] and TOK.decode(s.tokens) == "abchéllo" and s.n_bytes == 9
    assert c.subset(np.array([True, False, True])).ids == ["x", "z"]
    assert D.token_dtype(70000) == np.int32 and D.token_dtype(65535) == np.uint16
    with pytest.raises(ValueError, match="`offsets`"): TokenizedCorpus(np.zeros(3, np.uint16), np.array([0, 2]), ["a", "b"])


def test_load_corpus_splits_partition(temp_corpus):
    name, _ = temp_corpus
    full = load_corpus(name, "all")
    tr, va = load_corpus(name, "train", val_frac=0.2), load_corpus(name, "val", val_frac=0.2)
    assert sorted(tr.ids + va.ids) == sorted(full.ids) and tr.n_tokens + va.n_tokens == full.n_tokens
    assert set(va.ids) == {i for i in full.ids if D.is_val(i, 0.2)}
    for c in (tr, va):
        for i in range(len(c)): assert np.array_equal(c.doc(i), full.doc(full.ids.index(c.ids[i])))



def _uneven_docs(n=300, seed=0):
    "Documents of very different lengths, a few of them huge."
    rng = random.Random(seed)
    return [Document(f"u/{i:03d}", "x" * (50_000 if i % 37 == 0 else 1 + int(rng.random() * 3000))) for i in range(n)]


@pytest.mark.parametrize("min_tokens,max_share", [(20_000, 0.2), (50_000, 0.05), (1000, 1.0), (100_000, 0.3)])
def test_balanced_val_split_invariants(min_tokens, max_share):
    docs = _uneven_docs()
    tr, va = balanced_val_split(docs, min_tokens, max_share)
    st = val_split_stats(tr, va)
    assert st["val_tokens"] >= min_tokens and st["largest_share"] <= max_share + 1e-12
    assert st["largest_share"] == max(len(d.text) for d in va) / st["val_tokens"]
    assert {d.id for d in tr}.isdisjoint(d.id for d in va) and len(tr) + len(va) == len(docs) and len(tr) > 0
    val_ids = {d.id for d in va}
    assert [d.id for d in va] == [d.id for d in docs if d.id in val_ids]               # documents keep their order
    assert (st["train_docs"], st["val_docs"], st["train_tokens"] + st["val_tokens"]) == (len(tr), len(va), sum(len(d.text) for d in docs))
    # deterministic, and decided by ids and lengths only: not by the order of the documents
    assert balanced_val_split(docs, min_tokens, max_share) == (tr, va)
    shuffled = docs[:]; random.Random(1).shuffle(shuffled)
    assert {d.id for d in balanced_val_split(shuffled, min_tokens, max_share)[1]} == {d.id for d in va}
    # a TokenizedCorpus splits the same way
    ctr, cva = balanced_val_split(TokenizedCorpus.from_documents(docs), min_tokens, max_share)
    assert (ctr.ids, cva.ids, ctr.split, cva.split) == ([d.id for d in tr], [d.id for d in va], "train", "val")
    assert val_split_stats(ctr, cva) == st
    # another salt gives another split
    assert {d.id for d in balanced_val_split(docs, min_tokens, max_share, salt="other")[1]} != {d.id for d in va}


def test_balanced_val_mask_by_hand():
    ids = [f"d{k}" for k in range(8)]
    order = sorted(range(8), key=lambda k: stable_unit_hash(ids[k]))
    lens = np.full(8, 10); lens[order[1]] = 100
    m = balanced_val_mask(ids, lens, 30, 0.5)             # 100 > 0.5 * max(30, 10 + 100): skipped
    assert np.flatnonzero(m).tolist() == sorted(order[i] for i in (0, 2, 3))
    assert np.flatnonzero(balanced_val_mask(ids, lens, 30, 1.0)).tolist() == sorted(order[:2])
    lens2 = np.full(8, 12); lens2[order[3]] = 15           # 15 > 0.3 * 40, but 15 <= 0.3 * (36 + 15): the final total counts
    m2 = balanced_val_mask(ids, lens2, 40, 0.3)
    assert np.flatnonzero(m2).tolist() == sorted(order[:4]) and lens2[m2].max() <= 0.3 * lens2[m2].sum()
    # with salt "" the hash order is the default split's: its validation documents come first
    docs = _docs(400)
    default_val = {d.id for d in split_documents(docs, 0.05)[1]}
    need = sum(len(d.text) for d in docs if d.id in default_val)
    assert {d.id for d in balanced_val_split(docs, need, 1.0)[1]} == default_val


def test_balanced_val_split_cannot_be_satisfied():
    docs = _uneven_docs(40)
    total = sum(len(d.text) for d in docs)
    with pytest.raises(ValueError, match=r"`min_tokens`: expected at most the [\d,]+ tokens this corpus can give"):
        balanced_val_split(docs, 10 * total, 0.2)
    with pytest.raises(ValueError, match="`min_tokens`.*leaves training documents"):
        balanced_val_split(docs, total, 1.0)
    with pytest.raises(ValueError, match="`min_tokens`"):
        balanced_val_split([Document("one", "x" * 1000), Document("two", "y" * 10)], 500, 0.2)


@pytest.mark.parametrize("kw,arg,exc", [
    (dict(min_tokens=0), "min_tokens", ValueError), (dict(min_tokens=-5), "min_tokens", ValueError),
    (dict(min_tokens=1.5), "min_tokens", ValueError), (dict(min_tokens=True), "min_tokens", ValueError),
    (dict(max_share=0), "max_share", ValueError), (dict(max_share=1.5), "max_share", ValueError),
    (dict(max_share=float("nan")), "max_share", ValueError), (dict(max_share="0.2"), "max_share", ValueError),
    (dict(max_share=True), "max_share", ValueError), (dict(salt=3), "salt", TypeError)])
def test_balanced_val_split_argument_errors(kw, arg, exc):
    with pytest.raises(exc, match=f"`{arg}`"): balanced_val_split(_uneven_docs(), **{**dict(min_tokens=1000), **kw})


def test_balanced_val_split_bad_corpus():
    with pytest.raises(TypeError, match="`corpus`"): balanced_val_split(42)
    with pytest.raises(TypeError, match="`corpus`"): balanced_val_split([Document("a", "x"), ("b", "y")])
    with pytest.raises(ValueError, match="`lengths`"): balanced_val_mask(["a", "b"], [1], 1)
    with pytest.raises(ValueError, match="`lengths`"): balanced_val_mask(["a", "b"], [1, -1], 1)


@pytest.mark.parametrize("name", ["stdlib_code", "stdlib_defs"])
def test_balanced_val_split_builtin(name):
    c = TokenizedCorpus.from_documents(list(built(name)))
    tr, va = balanced_val_split(c)                           # defaults: at least 200k tokens, none above 20% of them
    st = val_split_stats(tr, va)
    assert st["val_tokens"] >= 200_000 and st["largest_share"] <= 0.2 and st["val_docs"] >= 10
    assert set(tr.ids).isdisjoint(va.ids) and len(tr) + len(va) == len(c) and tr.n_tokens + va.n_tokens == c.n_tokens
    assert split_corpus(c)[1].ids == [i for i in c.ids if D.is_val(i, 0.05)]   # the default split is untouched


# ---------------------------------------------------------------- cache
def test_cache_is_reused(fresh_cache, temp_corpus):
    name, calls = temp_corpus
    a = load_corpus(name, "all")
    files = sorted(p.name for p in (fresh_cache / "corpora").iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npz")
    meta = json.loads((fresh_cache / "corpora" / files[0]).read_text())
    for k in ("sha256", "n_tokens", "n_bytes", "n_docs", "splits", "python", "tokenizer", "corpus_version"): assert k in meta
    assert meta["n_tokens"] == a.n_tokens and meta["sha256"] == corpus_checksum(D.load_documents(name))
    calls.clear()
    b = load_corpus(name, "all")
    assert calls == []                                     # built once, then read from the cache
    assert np.array_equal(a.tokens, b.tokens) and a.ids == b.ids and np.array_equal(a.offsets, b.offsets)
    load_corpus(name, "all", seed=5); assert calls == [5]  # seeded corpora: one cache per seed
    c = load_corpus(name, "all", cache=False); assert calls == [5, 0] and np.array_equal(c.tokens, a.tokens)


def test_cache_faster_for_big_corpus(fresh_cache):
    t0 = time.perf_counter(); a = load_corpus("unicode_names", "all"); t_build = time.perf_counter() - t0
    t0 = time.perf_counter(); b = load_corpus("unicode_names", "all"); t_cached = time.perf_counter() - t0
    assert np.array_equal(a.tokens, b.tokens) and t_cached < t_build


@pytest.mark.parametrize("damage", ["truncate_npz", "garbage_npz", "delete_npz", "partial_json", "delete_json", "swap_npz"])
def test_corrupt_cache_is_rebuilt(fresh_cache, temp_corpus, damage):
    name, calls = temp_corpus
    good = load_corpus(name, "all")
    d = fresh_cache / "corpora"
    npz, js = next(d.glob("*.npz")), next(d.glob("*.json"))
    if damage == "truncate_npz": npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    elif damage == "garbage_npz": npz.write_bytes(b"not a zip at all")
    elif damage == "delete_npz": npz.unlink()
    elif damage == "partial_json": js.write_text(js.read_text()[:40])
    elif damage == "delete_json": js.unlink()
    elif damage == "swap_npz":  # a well-formed archive with other tokens
        with np.load(npz) as z: arrs = dict(z)
        arrs["tokens"] = arrs["tokens"][::-1].copy()
        with open(npz, "wb") as f: np.savez(f, **arrs)
    calls.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        again = load_corpus(name, "all")
    assert calls == [0]                                    # rebuilt
    if damage != "delete_json": assert any("rebuilding" in str(x.message) for x in w)
    assert np.array_equal(again.tokens, good.tokens) and again.ids == good.ids
    calls.clear(); load_corpus(name, "all"); assert calls == []   # and the repaired cache is used again


def _build_in_child(name):
    D.load_corpus(name, "all")


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_concurrent_builders_do_not_corrupt(fresh_cache, temp_corpus):
    name, _ = temp_corpus
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build_in_child, args=(name,)) for _ in range(3)]
    for p in procs: p.start()
    for p in procs: p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert not [p for p in (fresh_cache / "corpora").iterdir() if p.name.endswith(".tmp")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a valid cache: no "rebuilding" warning
        c = load_corpus(name, "all")
    assert corpus_checksum(load_documents(name)) == c.meta["sha256"]


def test_user_path_cache_follows_content(fresh_cache, tmp_path):
    f = tmp_path / "one.txt"; f.write_text("version one")
    assert TOK.decode(load_corpus(f, "all").tokens) == "version one"
    f.write_text("version two!")
    assert TOK.decode(load_corpus(f, "all").tokens) == "version two!"
    assert len(list((fresh_cache / "corpora").glob("path-*.npz"))) == 2


def test_corpus_card_numbers():
    card = corpus_card("synthetic_facts")
    full = load_corpus("synthetic_facts", "all")
    assert card["docs"] == len(full) and card["tokens"] == full.n_tokens == card["bytes"]
    sp = card["splits"]
    assert sp["train"]["docs"] + sp["val"]["docs"] == card["docs"] and sp["train"]["tokens"] + sp["val"]["tokens"] == card["tokens"]
    assert card["sha256"] == corpus_checksum(D.synthetic_facts(0)) and card["license"] and card["python"]
    assert "| synthetic_facts |" in D.card_table(["synthetic_facts"])


# ---------------------------------------------------------------- datasets
def _toy_corpus(seed=0, n=40):
    rng = random.Random(seed)
    lens = [0, 1, 7, 8, 9, 16] + [int(rng.random() * 60) for _ in range(n)]
    return TokenizedCorpus.from_documents([Document(f"t{i}", "".join(chr(97 + int(rng.random() * 26)) for _ in range(L))) for i, L in enumerate(lens)])


@pytest.mark.parametrize("seq_len", [1, 5, 16, 64])
def test_packed_dataset(seq_len):
    c = _toy_corpus()
    ds = PackedDataset(c, seq_len, TOK.eot_id)
    stream = np.concatenate([np.concatenate([[TOK.eot_id], c.doc(i)]) for i in range(len(c))])
    assert len(ds) == (len(stream) - 1) // seq_len
    doc_of = np.concatenate([[i] * (len(c.doc(i)) + 1) for i in range(len(c))])   # EOT belongs to the doc it opens
    for i in range(len(ds)):
        it = ds[i]; x, y, d = it["input_ids"], it["labels"], it["doc_ids"]
        assert x.dtype == y.dtype == d.dtype == torch.long and x.shape == y.shape == d.shape == (seq_len,)
        s = i * seq_len
        assert x.tolist() == stream[s:s + seq_len].tolist() and y.tolist() == stream[s + 1:s + seq_len + 1].tolist()
        assert torch.equal(x[1:], y[:-1])                                  # labels are the inputs shifted by one
        assert ((d[1:] != d[:-1]) == (x[1:] == TOK.eot_id)).all()          # doc_ids change exactly at EOT
        assert d[0] == 0 and (np.diff(d.numpy()) >= 0).all()
        assert (d.numpy() == doc_of[s:s + seq_len] - doc_of[s]).all()
    assert torch.equal(ds[-1]["input_ids"], ds[len(ds) - 1]["input_ids"])
    with pytest.raises(IndexError): ds[len(ds)]
    with pytest.raises(ValueError, match="`seq_len`"): PackedDataset(c, 0, TOK.eot_id)
    with pytest.raises(ValueError, match="`seq_len`"): PackedDataset(c, 10**6, TOK.eot_id)


def test_boundary_share_hand_made():
    docs = [Document("a", "abc"), Document("b", "de"), Document("c", "fghij")]
    c = TokenizedCorpus.from_documents(docs)              # packed: E a b c E d e E f g h i j (EOT at 0, 4, 7)
    assert boundary_share(c, 4) == 1 / 3                  # [E a b c] [E d e E] [f g h i]
    assert boundary_share(c, 3) == 2 / 4                  # [E a b] [c E d] [e E f] [g h i]
    assert boundary_share(c, 5) == 1.0                    # [E a b c E] [d e E f g]
    assert boundary_share(c, 12) == 1.0 and boundary_share(c, 1) == 0.0
    assert boundary_share(docs, 4) == 1 / 3               # documents are tokenized and packed the same way
    assert boundary_share([Document("x", "a" * 100)], 10) == 0.0   # one document never crosses


@pytest.mark.parametrize("window", [1, 2, 5, 16, 64])
def test_boundary_share_matches_packed_dataset(window):
    c = _toy_corpus(3)
    ds = PackedDataset(c, window, TOK.eot_id)
    want = np.mean([bool(ds[i]["doc_ids"].any()) for i in range(len(ds))])
    assert boundary_share(c, window) == pytest.approx(want, abs=1e-12)


def test_boundary_share_errors(tmp_path):
    c = TokenizedCorpus.from_documents([Document("a", "abc"), Document("b", "de")])
    with pytest.raises(ValueError, match="`window`"): boundary_share(c, 0)
    with pytest.raises(ValueError, match="`window`"): boundary_share(c, 7)       # 7 packed tokens: at most 6
    with pytest.raises(ValueError, match="`window`"): boundary_share(c, 2.5)
    with pytest.raises(TypeError, match="`corpus`"): boundary_share(42, 4)
    with pytest.raises(TypeError, match="`corpus`"): boundary_share([Document("a", "x"), "not a doc"], 4)
    with pytest.raises(ValueError, match="`corpus`"): boundary_share([], 4)


def test_boundary_share_short_corpus_crosses_more():
    code = TokenizedCorpus.from_documents(list(built("stdlib_code")))
    defs = TokenizedCorpus.from_documents(list(built("stdlib_defs")))
    for w in (128, 1024):
        assert boundary_share(defs, w) > 4 * boundary_share(code, w)
    assert boundary_share(defs, 1024) > 0.25 and boundary_share(code, 1024) < 0.1


@pytest.mark.parametrize("window", [1, 3, 8, 16, 100])
def test_doc_window_dataset_covers_every_token_once(window):
    c = _toy_corpus(1)
    ds = DocWindowDataset(c, window, TOK.eot_id, TOK.pad_id)
    got = {i: [] for i in range(len(c))}
    for j in range(len(ds)):
        it = ds[j]; x, y, pos, di = it["input_ids"], it["labels"], it["positions"], it["doc_index"]
        assert x.shape == y.shape == pos.shape == (window,)
        pad = y == -100
        assert ((pos == -1) == pad).all() and (x[pad] == TOK.pad_id).all()
        if pad.any(): assert pad[pad.nonzero()[0, 0]:].all()          # padding only at the end
        assert not pad[0]
        toks = np.concatenate([[TOK.eot_id], c.doc(di)])
        p = pos[~pad].numpy()
        assert (y[~pad].numpy() == toks[p + 1]).all() and (x[~pad].numpy() == toks[p]).all()   # input = token before, EOT first
        got[di] += p.tolist()
    for i in range(len(c)): assert got[i] == list(range(len(c.doc(i)))), i   # every token exactly once, in order
    assert ds.n_tokens == c.n_tokens and ds.n_bytes == c.n_bytes


def test_doc_window_subset_selection():
    c = _toy_corpus(2, n=200)
    for kw in (dict(max_docs=10), dict(max_tokens=500), dict(max_docs=7, max_tokens=300)):
        a, b = select_eval_docs(c, **kw), select_eval_docs(c, **kw)
        assert np.array_equal(a, b) and (np.diff(a) > 0).all() and len(a) >= 1
        if "max_docs" in kw: assert len(a) <= kw["max_docs"]
        if "max_tokens" in kw: assert c.lengths[a].sum() <= kw["max_tokens"]
        ds = DocWindowDataset(c, 8, TOK.eot_id, TOK.pad_id, **kw)
        assert set(ds.doc_indices.tolist()) == set(a.tolist()) and ds.n_tokens == c.lengths[a].sum()
    assert len(select_eval_docs(c, max_tokens=1)) >= 1           # never empty
    assert len(select_eval_docs(c)) == len(c)
    with pytest.raises(ValueError, match="`max_docs`"): select_eval_docs(c, max_docs=0)
    # the selection of a document does not depend on the other documents
    sub = c.subset(np.arange(0, len(c), 2))
    assert set(sub.ids[i] for i in select_eval_docs(sub, max_docs=len(sub))) == set(sub.ids)


# ---------------------------------------------------------------- DataModules
def test_lm_datamodule_batches():
    dm = LMDataModule("synthetic_facts", seq_len=32, batch_size=4, eval_batch_size=3, max_eval_tokens=2000)
    assert dm.train_corpus is None and len(pickle.dumps(dm)) < 10_000            # cheap, picklable, loads in setup
    dm.setup("fit")
    assert isinstance(dm.tokenizer, ByteTokenizer) and dm.train_corpus is not None and dm.val_corpus is not None
    assert not set(dm.train_corpus.ids) & set(dm.val_corpus.ids)
    tl = dm.train_dataloader()
    batches = list(tl)
    assert len(batches) == len(dm.train_dataset) // 4
    for b in batches:
        assert {k: tuple(v.shape) for k, v in b.items()} == {"input_ids": (4, 32), "labels": (4, 32), "doc_ids": (4, 32)}
        assert b["input_ids"].dtype == torch.long
    vb = next(iter(dm.val_dataloader()))
    assert vb["input_ids"].shape == vb["labels"].shape == vb["positions"].shape == (3, 32) and vb["doc_index"].shape == (3,)
    assert dm.val_dataset.n_tokens <= 2000
    # seeded shuffling: same seed same order, another seed another order; epochs differ
    again = LMDataModule("synthetic_facts", seq_len=32, batch_size=4)
    assert torch.equal(next(iter(again.train_dataloader()))["input_ids"], batches[0]["input_ids"])
    other = LMDataModule("synthetic_facts", seq_len=32, batch_size=4, seed=1)
    assert not torch.equal(next(iter(other.train_dataloader()))["input_ids"], batches[0]["input_ids"])
    assert not torch.equal(next(iter(tl))["input_ids"], batches[0]["input_ids"])
    dm2 = pickle.loads(pickle.dumps(dm))                                         # also after setup
    assert torch.equal(dm2.train_dataset[0]["input_ids"], dm.train_dataset[0]["input_ids"])


def test_lm_datamodule_ddp_sampler_and_inputs():
    dm = LMDataModule("synthetic_facts", seq_len=16, batch_size=2)
    ds = dm.train_dataset
    idx = [list(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=0)) for r in (0, 1)]
    assert set(idx[0]) | set(idx[1]) == set(range(len(ds))) and len(idx[0]) == len(idx[1])
    assert all(ds[i]["input_ids"].shape == (16,) for i in idx[0][:5])
    full = load_corpus("synthetic_facts", "all")
    tr, va = split_corpus(full, 0.2)
    dmp = LMDataModule((tr, va), seq_len=16, batch_size=2); dmp.setup()
    assert dmp.train_corpus is tr and dmp.val_corpus is va
    dmc = LMDataModule(full, seq_len=16, batch_size=2, val_frac=0.2); dmc.setup()
    assert dmc.val_corpus.ids == va.ids
    assert LMDataModule("synthetic_facts", seq_len=8).eval_window == 8


@pytest.mark.parametrize("kw,arg", [(dict(seq_len=0), "seq_len"), (dict(batch_size=0), "batch_size"), (dict(eval_window=-3), "eval_window"),
                                    (dict(val_frac=1), "val_frac"), (dict(num_workers=-1), "num_workers"), (dict(seq_len=2.5), "seq_len"),
                                    (dict(max_eval_tokens=0), "max_eval_tokens"), (dict(seed=-1), "seed")])
def test_lm_datamodule_argument_errors(kw, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"): LMDataModule("synthetic_facts", **kw)


def test_lm_datamodule_too_few_windows():
    dm = LMDataModule("synthetic_facts", seq_len=4096, batch_size=64)
    with pytest.raises(ValueError, match="`batch_size`"): dm.train_dataloader()
    with pytest.raises(TypeError, match="`corpus`"): LMDataModule(corpus=123)


def test_doc_eval_datamodule():
    dm = DocEvalDataModule("synthetic_facts", split="all", window=64, batch_size=8)
    dm.setup()
    assert len(dm.eval_corpus) == 200
    n = 0
    for b in dm.test_dataloader():
        assert b["input_ids"].shape[1] == 64; n += int((b["labels"] != -100).sum())
    assert n == dm.eval_corpus.n_tokens
    val = DocEvalDataModule(load_corpus("synthetic_facts", "all"), split="val", window=64); val.setup()
    assert val.eval_corpus.ids == load_corpus("synthetic_facts", "val").ids
    with pytest.raises(ValueError, match="`split`"): DocEvalDataModule(split="dev")


# ---------------------------------------------------------------- fixtures
def test_tiny_fixtures_are_generated(tmp_path):
    tiny = repo_root() / "data" / "tiny"
    written = write_tiny_fixtures(tmp_path)
    committed = sorted(p.relative_to(tiny).as_posix() for p in tiny.rglob("*") if p.is_file())
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == committed
    for p in written: assert p.read_bytes() == (tiny / p.relative_to(tmp_path)).read_bytes(), p
    assert sum(p.stat().st_size for p in written) < 64_000
    assert len(load_documents(tiny / "facts.jsonl")) == 60
    with pytest.warns(UserWarning, match="skipped 1 of 4 files that are not UTF-8 text: blob.bin"):
        assert [d.id for d in load_documents(tiny / "folder")] == ["code/times.py", "more/people.md", "notes.txt"]


# ---------------------------------------------------------------- symbolic links, empty records
def _write_people(folder, prefix, seed, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    for k, d in enumerate(D.synthetic_facts(seed=seed, n_entities=n)):
        (folder / f"{prefix}{k}.txt").write_text(d.text)


def _link(link, target):
    link.symlink_to(target, target_is_directory=True)


def test_symlinked_subfolders_are_read(tmp_path):
    root, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    _write_people(root, "own", 20)
    _write_people(elsewhere / "a", "a", 21)
    _write_people(elsewhere / "b", "b", 22)
    _link(root / "a", elsewhere / "a")
    _link(root / "b", elsewhere / "b")
    assert len([p for p in root.rglob("*") if p.is_file()]) == 3   # a walk that ignores links
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # nothing skipped: no warning
        docs = load_documents(root)
    want = [f"{s}/{s}{k}.txt" for s in "ab" for k in range(3)] + [f"own{k}.txt" for k in range(3)]
    assert [d.id for d in docs] == want
    assert docs[0].text == (elsewhere / "a" / "a0.txt").read_text()
    assert len(load_corpus(root, "all")) == 9                      # and through load_corpus
    # a folder without links reads as it always did: sorted paths, hidden and __pycache__ skipped
    plain = tmp_path / "plain"
    _write_people(plain / "sub", "s", 23)
    _write_people(plain / ".hidden", "h", 24)
    _write_people(plain / "__pycache__", "c", 25)
    assert [d.id for d in load_documents(plain)] == [f"sub/s{k}.txt" for k in range(3)]


def test_symlink_loops_and_repeats_are_skipped_and_named(tmp_path):
    root, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    _write_people(root / "sub", "s", 30)
    _write_people(elsewhere / "ext", "e", 31)
    _link(root / "self", root)                          # a loop to the folder itself
    _link(root / "sub" / "up", root)                    # a loop to a parent
    _link(root / "ext", elsewhere / "ext")              # followed
    _link(root / "ext2", elsewhere / "ext")             # the same folder again
    _link(root / "inner", root / "sub")                 # read as sub/ already
    _link(elsewhere / "ext" / "back", elsewhere)        # a loop outside the corpus folder
    (root / "dead.txt").symlink_to(tmp_path / "missing.txt")   # broken
    with pytest.warns(UserWarning) as rec:
        docs = load_documents(root)
    want = [f"ext/e{k}.txt" for k in range(3)] + [f"sub/s{k}.txt" for k in range(3)]
    assert [d.id for d in docs] == want
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 1 and msgs[0].startswith(f"{root}: skipped 6 symbolic link(s)")
    for part in ("ext2 (the same folder as ext)", "inner (inside the folder: sub)", "self (a loop)",
                 "dead.txt (broken)", "ext/back (a loop)", "... (1 more)"):
        assert part in msgs[0], (part, msgs[0])
    # a folder of nothing but a loop is empty, and says why
    lone = tmp_path / "lone"
    lone.mkdir()
    _link(lone / "again", lone)
    with pytest.warns(UserWarning, match=r"again \(a loop\)"):
        with pytest.raises(ValueError, match="is empty"): load_documents(lone)


def test_jsonl_empty_records_are_skipped_and_counted(tmp_path):
    jl = tmp_path / "people.jsonl"
    texts = [d.text for d in D.synthetic_facts(seed=7, n_entities=3)]
    recs = [{"text": texts[0]}, {"id": "e1", "text": ""}, {"text": texts[1]}, {"text": "   "},
            {"text": "\n\t \r\n"}, {"id": "last", "text": texts[2]}]
    jl.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.warns(UserWarning) as rec:
        docs = load_documents(jl)
    assert [d.id for d in docs] == ["people.jsonl:1", "people.jsonl:3", "last"]
    assert [str(w.message) for w in rec] == [
        f'{jl}: skipped 3 of 6 records whose "text" is empty or only whitespace (lines 2, 4, 5)']
    # every record empty: an error naming the file and the lines
    blank = ["", " ", "\n", "", "  ", "", "\t"]
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in blank))
    with pytest.raises(ValueError) as e: load_documents(jl)
    msg = str(e.value)
    assert repr(str(jl)) in msg and "is empty" in msg and "`source`" in msg, msg
    lines = "(lines 1, 2, 3, 4, 5, ... (2 more))"
    assert f'7 record(s) whose "text" is empty or only whitespace {lines}' in msg, msg
    # records with text never warn
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_documents(jl)) == 3


# ---------------------------------------------------------------- validation always has text
def _val_trap_ids():
    "Ids where the hash rule (val_frac=0.05) puts only 'chunk.py' in validation."
    ids = [f"part{k}.txt" for k in range(6)] + ["chunk.py"]
    assert [D.is_val(i, 0.05) for i in ids] == [False] * 6 + [True]
    return ids


def test_validation_split_is_never_only_empty_documents():
    ids = _val_trap_ids()
    first = min(ids[:6], key=stable_unit_hash)
    docs = [Document(i, "" if i == "chunk.py" else _gen_text(k)) for k, i in enumerate(ids)]
    want = rf"only documents without text \(1 of the 7\) .* adding the non-empty .* {first!r}"
    with pytest.warns(UserWarning, match=want):
        tr, va = split_documents(docs)
    assert [d.id for d in va] == [first, "chunk.py"] and len(tr) == 5 and any(d.text for d in va)
    corpus = TokenizedCorpus.from_documents(docs)
    with pytest.warns(UserWarning, match="small-corpus fallback"):
        ctr, cva = split_corpus(corpus)
    assert cva.ids == [first, "chunk.py"] and cva.n_tokens > 0
    assert ctr.n_tokens + cva.n_tokens == corpus.n_tokens
    with pytest.warns(UserWarning, match="small-corpus fallback"):
        dm = LMDataModule(corpus, seq_len=16, batch_size=2)
        dm.setup()
    assert dm.val_corpus.n_tokens > 0 and len(dm.val_dataloader()) > 0
    # a registered corpus with an empty document goes through the same rule in load_corpus
    register_corpus("_t_empty_val", lambda seed: docs, seeded=False)
    try:
        with pytest.warns(UserWarning, match="small-corpus fallback"):
            assert load_corpus("_t_empty_val", "val", cache=False).ids == [first, "chunk.py"]
    finally: CORPORA.pop("_t_empty_val")
    # fewer than two documents with text: no split can give both sides text
    one = [Document(i, "" if k else "some text") for k, i in enumerate(ids)]
    err = r"`val_frac`: .* needs at least 2 non-empty documents, got 1 of 7"
    with pytest.raises(ValueError, match=err): split_documents(one)
    with pytest.raises(ValueError, match=err): split_corpus(TokenizedCorpus.from_documents(one))
    assert split_documents(one, 0.0)[1] == []               # val_frac=0: no split, no error


def test_empty_documents_leave_text_splits_unchanged():
    "With text everywhere the lengths change nothing: the same split, with or without them."
    docs = _docs(300)
    ids = [d.id for d in docs]
    lens = [len(d.text) for d in docs]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(D.val_mask(ids, 0.05, lengths=lens), D.val_mask(ids, 0.05))
    # an empty document the hash puts in train, among documents with text, stays in train quietly
    docs[0] = Document(docs[0].id, "")
    tr, va = split_documents(docs, 0.1)
    assert not D.is_val(docs[0].id, 0.1) and docs[0] in tr
    assert {d.id for d in va} == {i for i in ids if D.is_val(i, 0.1)}


def test_select_eval_docs_never_only_empty():
    c = TokenizedCorpus.from_documents([Document("e0", ""), Document("e1", ""),
                                        Document("long", "x" * 50), Document("mid", "y" * 20)])
    sel = select_eval_docs(c, max_tokens=5)        # nothing with text fits: the shortest with text
    assert "mid" in [c.ids[i] for i in sel] and c.lengths[sel].sum() == 20
    for k in (1, 2):
        sel = select_eval_docs(c, max_docs=k)      # empty documents do not use up max_docs
        assert (c.lengths[sel] > 0).sum() == k
    ds = DocWindowDataset(c, 8, TOK.eot_id, TOK.pad_id, max_docs=1)
    assert len(ds) > 0 and ds.n_tokens > 0


# ---------------------------------------------------------------- the data layer's modules
DATA_MODULES = ("corpora", "facts", "user_corpus", "tokens", "corpus_cache", "windows",
                "datamodules")


def test_data_reexports_every_module_name():
    names = []
    for m in DATA_MODULES:
        mod = importlib.import_module(f"trainlab.{m}")
        for n in mod.__all__: assert getattr(D, n) is getattr(mod, n), (m, n)
        names += mod.__all__
    assert sorted(D.__all__) == sorted(names) and len(names) == len(set(names))
    for n in ("LMDataModule", "DocEvalDataModule", "load_corpus", "ByteTokenizer", "Document",
              "TokenizedCorpus", "CORPORA", "register_corpus", "write_tiny_fixtures"):
        assert n in D.__all__, n


def _trainlab_imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level or (node.module or "").startswith("trainlab"):
                yield node


def test_data_modules_are_small_and_import_explicitly():
    root = repo_root() / "trainlab"
    for m in ("data",) + DATA_MODULES:
        text = (root / f"{m}.py").read_text()
        assert len(text.splitlines()) <= 400, m
        for node in _trainlab_imports(ast.parse(text)):
            for a in node.names:
                assert a.name != "*", f"{m}: star import from {node.module}"
                assert not a.name.startswith("_"), f"{m}: imports {a.name} from {node.module}"
