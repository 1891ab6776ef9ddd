"""extend_bpe on two byte-level BPE families: SmolLM2's (GPT-2 regex inside ByteLevel) and a
Llama-3-style one built from scratch (GPT-4 regex Split, ignore_merges=True)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llamazh.tokenizer import BPEExtension, encoding_efficiency, extend_bpe
from llamazh.tokenizer._bytelevel import byte_alphabet, bytes_to_token, token_bytes

FAMILIES = ["smollm2", "llama3"]


def _ids(tok, texts):
    return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]


@pytest.mark.parametrize("family", FAMILIES)
def test_base_ids_merges_and_settings_kept(bpe_bases, bpe_extensions, family):
    base, ext = bpe_bases[family], bpe_extensions[family]
    assert isinstance(ext, BPEExtension) and len(ext.new_tokens) == len(ext.merges)
    size = base.get_vocab_size(with_added_tokens=True)
    assert ext.base_vocab_size == size and ext.tokenizer.get_vocab_size(True) == ext.vocab_size
    for i in range(size):
        assert ext.tokenizer.id_to_token(i) == base.id_to_token(i)
    for k, token in enumerate(ext.new_tokens):
        assert ext.tokenizer.token_to_id(token) == size + k
    a, b = json.loads(base.to_str()), json.loads(ext.tokenizer.to_str())
    assert a["added_tokens"] == b["added_tokens"]  # ids, content and flags
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "truncation"):
        assert a[key] == b[key], key
    ma, mb = a["model"], b["model"]
    assert {k: v for k, v in ma.items() if k not in ("vocab", "merges")} == {
        k: v for k, v in mb.items() if k not in ("vocab", "merges")
    }
    assert mb["merges"][: len(ma["merges"])] == ma["merges"]
    assert [tuple(m) for m in mb["merges"][len(ma["merges"]) :]] == list(ext.merges)
    assert all(left + right == t for (left, right), t in zip(ext.merges, ext.new_tokens))
    assert "base +" in str(ext)


@pytest.mark.parametrize("family", FAMILIES)
def test_english_line_for_line_identical(bpe_bases, bpe_extensions, corpus_lines, family):
    lines = corpus_lines["en_d2l"]
    got, want = _ids(bpe_extensions[family].tokenizer, lines), _ids(bpe_bases[family], lines)
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert bad == [], f"{len(bad)} of {len(lines)} en_d2l lines differ, first: {lines[bad[0]]!r}"


@pytest.mark.parametrize("family", FAMILIES)
def test_chinese_gets_fewer_tokens(bpe_bases, bpe_extensions, corpus_lines, family):
    texts = {"zh": corpus_lines["zh_d2l"][:300], "classical": corpus_lines["zh_classical"][:300]}
    report = encoding_efficiency(
        {"base": bpe_bases[family], "ext": bpe_extensions[family]}, texts
    ).as_dict()
    for name in texts:  # 1,500 new tokens from 4,000 lines: at least 1.33x fewer tokens
        assert report["ext"][name]["relative_tokens"] < 0.75, (name, report["ext"][name])


# Unicode the promises are about: simplified and traditional Chinese, kana, Hangul, emoji with
# skin-tone modifiers, ZWJ sequences and flags, full-width forms, whitespace runs, tabs,
# newlines, Latin, digits and any other non-surrogate character.
_CHUNKS = st.one_of(
    st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), min_size=1, max_size=6),
    st.sampled_from(list("體與們說時國學裡這個發應們愛")),
    st.text(st.characters(min_codepoint=0x3040, max_codepoint=0x30FF), min_size=1, max_size=4),
    st.text(st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3), min_size=1, max_size=4),
    st.sampled_from(["👍🏽", "👩‍👩‍👧", "🇨🇳", "😀", "🧑🏿‍💻", "✌️"]),
    st.text(st.characters(min_codepoint=0xFF01, max_codepoint=0xFF5E), min_size=1, max_size=4),
    st.text(st.sampled_from(" \t\n\r\u3000"), min_size=1, max_size=6),
    st.sampled_from(["Hello", " the", "GPU", "don't", "3.14", "，", "。", "“", "”"]),
    st.characters(exclude_categories=("Cs",)),
)


@st.composite
def _texts(draw, ext):
    pieces = [t for t in ext.new_token_text() if "\ufffd" not in t]
    chunk = st.one_of(_CHUNKS, st.sampled_from(pieces))
    return "".join(draw(st.lists(chunk, max_size=12)))


@pytest.mark.parametrize("family", FAMILIES)
@given(data=st.data())
def test_round_trip(bpe_extensions, family, data):
    tok = bpe_extensions[family].tokenizer
    text = data.draw(_texts(bpe_extensions[family]))
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("family", FAMILIES)
@given(data=st.data())
def test_untouched_text_encodes_as_base(bpe_bases, bpe_extensions, family, data):
    """Text whose base tokens hold no new merge pair (and no pre-token that is a new token,
    which ignore_merges would emit whole) encodes exactly as with the base; ASCII always."""
    base, ext = bpe_bases[family], bpe_extensions[family]
    text = data.draw(st.one_of(_texts(ext), st.text(st.characters(max_codepoint=0x7F))))
    want = base.encode(text, add_special_tokens=False)
    got = ext.tokenizer.encode(text, add_special_tokens=False).ids
    pairs, new = set(ext.merges), set(ext.new_tokens)
    pre = base.pre_tokenizer.pre_tokenize_str(text)
    touched = any(p in pairs for p in zip(want.tokens, want.tokens[1:])) or any(
        piece in new for piece, _ in pre
    )
    if not touched or text.isascii():
        assert got == want.ids


def reachable_fraction(ext: BPEExtension) -> tuple[float, list[str]]:
    """Share of the new tokens that decode to whole characters and encode, alone, to
    themselves (over those that decode to whole characters), and the unreachable ones."""
    whole, missed = 0, []
    for k, token in enumerate(ext.new_tokens):
        try:
            text = token_bytes(token).decode("utf-8")
        except UnicodeDecodeError:
            continue  # a partial character: only reachable inside longer text
        whole += 1
        if ext.tokenizer.encode(text, add_special_tokens=False).ids != [ext.base_vocab_size + k]:
            missed.append(text)
    return 1 - len(missed) / whole, missed


@pytest.mark.parametrize("family", FAMILIES)
def test_new_tokens_are_reachable(bpe_extensions, family):
    fraction, missed = reachable_fraction(bpe_extensions[family])
    assert fraction >= 0.97, (fraction, missed[:20])
    assert bpe_extensions[family].reachability() == (fraction, missed)


def test_ignore_merges_emits_a_new_pre_token_whole(bpe_extensions):
    ext = bpe_extensions["llama3"]
    assert json.loads(ext.tokenizer.to_str())["model"]["ignore_merges"] is True
    whole = [
        (k, t)
        for k, t in enumerate(ext.new_tokens)
        if ext.tokenizer.pre_tokenizer.pre_tokenize_str(_decode(t) or "\ufffd")[0][0] == t
    ]
    assert whole
    for k, token in whole:
        assert ext.tokenizer.encode(_decode(token), add_special_tokens=False).ids == [
            ext.base_vocab_size + k
        ]


def _decode(token: str) -> str | None:
    try:
        return token_bytes(token).decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_byte_alphabet():
    from tokenizers import pre_tokenizers

    to_char, to_byte = byte_alphabet()
    assert len(to_char) == len(to_byte) == 256 and to_char[0x20] == "Ġ"
    assert set(to_byte) == set(pre_tokenizers.ByteLevel.alphabet())  # the oracle
    text = "深度 learning 👍🏽\t"
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    assert bytes_to_token(text.encode()) == byte_level.pre_tokenize_str(text)[0][0]
    assert token_bytes(bytes_to_token(text.encode())) == text.encode()
    assert token_bytes("\u2581x") is None


@pytest.mark.parametrize("family", FAMILIES)
def test_save_loads_with_auto_tokenizer(
    bpe_bases, bpe_extensions, smollm2_dir, corpus_lines, tmp_path, family
):
    from transformers import AutoTokenizer

    ext = bpe_extensions[family]
    out = ext.save(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(str(out))
    assert len(hf) == ext.vocab_size
    lines = corpus_lines["zh_d2l"][:200] + corpus_lines["en_d2l"][:200]
    assert hf(lines, add_special_tokens=False).input_ids == _ids(ext.tokenizer, lines)
    assert hf.decode(hf(lines[0]).input_ids) == lines[0]
    if family == "smollm2":
        base = AutoTokenizer.from_pretrained(str(smollm2_dir))
        chat = [{"role": "user", "content": "你好"}]
        assert hf.apply_chat_template(chat, tokenize=False) == base.apply_chat_template(
            chat, tokenize=False
        )
        assert (hf.bos_token, hf.eos_token, hf.pad_token, hf.unk_token) == (
            base.bos_token,
            base.eos_token,
            base.pad_token,
            base.unk_token,
        )
        assert sorted(p.name for p in out.iterdir()) == [
            "chat_template.jinja",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    else:
        assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
        assert hf.convert_ids_to_tokens([4000, 4001]) == ["<|bot|>", "<|eot|>"]


def test_base_kinds(smollm2_dir, bpe_train_lines, tmp_path):
    """A directory, a tokenizer.json path, a tokenizers.Tokenizer and a transformers
    tokenizer give the same extension; Path items of texts are files."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    text = tmp_path / "zh.txt"
    text.write_text("\n".join(bpe_train_lines[:600]) + "\n\n", encoding="utf-8")
    kinds = [
        smollm2_dir,
        str(smollm2_dir / "tokenizer.json"),
        Tokenizer.from_file(str(smollm2_dir / "tokenizer.json")),
        AutoTokenizer.from_pretrained(str(smollm2_dir)),
    ]
    got = [extend_bpe(k, [text], new_tokens=200).new_tokens for k in kinds]
    assert all(g == got[0] for g in got)
    assert extend_bpe(kinds[0], bpe_train_lines[:600], new_tokens=200).new_tokens == got[0]
    hf_ext = extend_bpe(kinds[3], [text], new_tokens=200)
    assert "tokenizer_config.json" in hf_ext.side_files  # what save_pretrained wrote


def test_scopes(smollm2_dir, bpe_train_lines):
    lines = [*bpe_train_lines[:800], "softmax softmax softmax" * 3]
    cjk = extend_bpe(smollm2_dir, lines, new_tokens=300)
    every = extend_bpe(smollm2_dir, lines, new_tokens=300, scope="all")
    non_ascii = extend_bpe(smollm2_dir, lines, new_tokens=300, scope="non_ascii")
    assert all(not token_bytes(t).isascii() for t in cjk.new_tokens + non_ascii.new_tokens)
    assert any(token_bytes(t).isascii() for t in every.new_tokens)


def test_bad_inputs(smollm2_dir, bpe_train_lines, llama2_model_path, tmp_path):
    from tokenizers import Tokenizer, models

    from llamazh.tokenizer import build_fast_tokenizer

    with pytest.raises(ValueError, match="new_tokens must be >= 1"):
        extend_bpe(smollm2_dir, ["你好"], new_tokens=0)
    with pytest.raises(TypeError, match="new_tokens must be an int"):
        extend_bpe(smollm2_dir, ["你好"], new_tokens=True)
    with pytest.raises(ValueError, match="scope must be one of"):
        extend_bpe(smollm2_dir, ["你好"], scope="latin")
    with pytest.raises(TypeError, match="texts must be an iterable"):
        extend_bpe(smollm2_dir, "你好你好")
    with pytest.raises(FileNotFoundError, match=r"texts: .* is not an existing file"):
        extend_bpe(smollm2_dir, [tmp_path / "none.txt"])
    with pytest.raises(ValueError, match="texts holds no text"):
        extend_bpe(smollm2_dir, [])
    with pytest.raises(
        ValueError,
        match=r"new_tokens=5000 is more than this text supports: it "
        r"has \d+ pairs",
    ):
        extend_bpe(smollm2_dir, bpe_train_lines[:20], new_tokens=5000)
    # not byte-level: a SentencePiece-style BPE (Llama-2's fast tokenizer), WordPiece
    with pytest.raises(ValueError, match=r"pre-tokenizer is None .*supported: byte-level BPE"):
        extend_bpe(build_fast_tokenizer(llama2_model_path), ["你好"])
    with pytest.raises(ValueError, match="has a WordPiece model; supported: byte-level BPE"):
        extend_bpe(Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1})), ["你好"])
    with pytest.raises(TypeError, match="base must be a tokenizer directory"):
        extend_bpe(3, ["你好"])
    with pytest.raises(FileNotFoundError, match=r"without a tokenizer\.json"):
        extend_bpe(tmp_path, ["你好"])
    bad = tmp_path / "bad.json"
    bad.write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match=r"is not a tokenizer\.json"):
        extend_bpe(bad, ["你好"])


def test_save_refuses_existing_and_is_atomic(bpe_extensions, tmp_path, monkeypatch):
    ext = bpe_extensions["smollm2"]
    out = tmp_path / "tok"
    out.mkdir()
    (out / "mine.txt").write_text("keep", encoding="utf-8")
    with pytest.raises(FileExistsError, match="out_dir="):
        ext.save(out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    ext.save(out, overwrite=True)
    assert (out / "tokenizer.json").is_file() and not (out / "mine.txt").exists()

    class Boom:
        def save(self, path):
            Path(path).write_text("half", encoding="utf-8")
            raise KeyboardInterrupt

    broken = BPEExtension(Boom(), ext.new_tokens, ext.base_vocab_size, ext.merges, 0, {})
    with pytest.raises(KeyboardInterrupt):
        broken.save(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_cjk_token_rule():
    from llamazh.tokenizer._bytelevel import cjk_token

    yes = ["中".encode()[:2], "中".encode()[1:], "你好".encode(), "a中".encode(), "，".encode()]
    yes += ["\U00020000".encode()[:2], b"ab" + "中".encode()[:1]]
    no = [b"a", ";”".encode(), " “&".encode(), "😀".encode()[:2], "é".encode(), b""]
    assert [cjk_token(x) for x in yes] == [True] * len(yes)
    assert [cjk_token(x) for x in no] == [False] * len(no)
