"""The exported Hugging Face tokenizer against sentencepiece itself.

Exact (ids and round trip) for Llama-2 and for scores="rank" merges (fast tokenizer.json), on
every corpus line and on drawn text. scores="seed" merges: exact ids through transformers'
SentencePieceBackend (the default export for tied scores); their fast export only round-trips
(see export.py).
"""

from __future__ import annotations

import json
import warnings

import pytest
import sentencepiece as spm
from hypothesis import assume, given
from hypothesis import strategies as st

from llamazh.tokenizer import export_hf_tokenizer, tied_merge_pieces
from llamazh.tokenizer._proto import load_proto

SPECIAL_TEXT = ("<s>", "</s>", "<unk>")  # read as special tokens by transformers, by design


def _load(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="session")
def exported(tmp_path_factory, llama2_model_path, merged_rank, merged_seed):
    """name -> (HF tokenizer, sentencepiece processor)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, model, backend in [
        ("llama2", llama2_model_path, "auto"),
        ("rank", merged_rank, "auto"),
        ("seed", merged_seed, "auto"),
        ("seed-fast", merged_seed, "fast"),
    ]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            path = export_hf_tokenizer(model, root / name, backend=backend)
        proto = load_proto(model, "model")
        out[name] = (_load(path), spm.SentencePieceProcessor(model_proto=proto.SerializeToString()))
    return out


def _agree(hf, sp, texts):
    got = hf(texts).input_ids
    want = [[sp.bos_id(), *ids] for ids in sp.encode(texts)]
    bad = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
    return bad, got


@pytest.mark.parametrize("name", ["llama2", "rank", "seed"])
@pytest.mark.parametrize("corpus", ["zh_d2l", "en_d2l", "zh_classical"])
def test_exact_on_every_corpus_line(exported, corpus_lines, name, corpus):
    hf, sp = exported[name]
    lines = corpus_lines[corpus]
    bad, got = _agree(hf, sp, lines)
    assert not bad, f"{len(bad)} of {len(lines)} lines differ, first: {bad[0]}"
    if name == "seed":  # SentencePieceBackend joins piece strings; its sp_model decodes
        assert type(hf).__name__ == "SentencePieceBackend"
        decoded = [hf.sp_model.decode(ids) for ids in got]
    else:
        decoded = hf.batch_decode(got, skip_special_tokens=True)
    assert [i for i, (d, x) in enumerate(zip(decoded, lines)) if d != x] == []


@pytest.mark.parametrize("corpus", ["zh_d2l", "en_d2l", "zh_classical"])
def test_seed_export_round_trips(exported, corpus_lines, corpus):
    hf, sp = exported["seed-fast"]
    lines = corpus_lines[corpus]
    decoded = hf.batch_decode(hf(lines).input_ids, skip_special_tokens=True)
    assert decoded == lines
    assert [sp.decode(ids) for ids in sp.encode(lines)] == lines


@pytest.mark.parametrize("name", ["llama2", "rank", "seed"])
@given(data=st.data())
def test_exact_on_drawn_text(exported, mixed_text, pieces_text, name, data):
    hf, sp = exported[name]
    proto = load_proto(sp.serialized_model_proto(), "m")
    texts = [data.draw(mixed_text), data.draw(pieces_text(proto))]
    texts += [f"  {texts[0]}  ", f"{texts[1]}   {texts[0]}\n"]
    assume(not any(s in t for t in texts for s in SPECIAL_TEXT))
    bad, got = _agree(hf, sp, texts)
    assert not bad
    if name == "seed":
        assert [hf.sp_model.decode(ids) for ids in got] == texts
    else:
        assert hf.batch_decode(got, skip_special_tokens=True) == texts


@given(data=st.data())
def test_seed_round_trip_on_drawn_text(exported, mixed_text, pieces_text, data):
    hf, sp = exported["seed-fast"]
    text = data.draw(mixed_text) + data.draw(
        pieces_text(load_proto(sp.serialized_model_proto(), "m"))
    )
    assume(not any(s in text for s in SPECIAL_TEXT))
    assert hf.decode(hf(text).input_ids, skip_special_tokens=True) == text


def test_whitespace_runs_and_edges(exported):
    hf, sp = exported["llama2"]
    texts = ["", " ", "  ", "  two  spaces", "a" + " " * 40 + "b", "\n\n  x", " \t x \t ", "x "]
    bad, _ = _agree(hf, sp, texts)
    assert not bad


def test_seed_ties_are_reported(merged_seed, merged_rank, llama2_model_path, tmp_path):
    assert tied_merge_pieces(llama2_model_path) == 0  # its -1e9 ties are whitespace-only
    assert tied_merge_pieces(merged_rank) == 0
    assert tied_merge_pieces(merged_seed) > 0
    with pytest.warns(UserWarning, match="scores='rank'"):
        export_hf_tokenizer(merged_seed, tmp_path / "seed", backend="fast")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = export_hf_tokenizer(merged_seed, tmp_path / "auto")  # sentencepiece: exact
    assert sorted(p.name for p in out.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "SentencePieceBackend"
    with pytest.raises(ValueError, match="backend must be one of"):
        export_hf_tokenizer(merged_seed, tmp_path / "x", backend="slow")
    assert not (tmp_path / "x").exists()


def test_published_seed_merge_exports_exactly(llama2_model_path, corpus_lines, tmp_path):
    """Chinese-LLaMA's 49,953 pieces behind AutoTokenizer: sentencepiece's ids on every
    zh_d2l line (its fast export differs on about one line in ten)."""
    from pathlib import Path

    from llamazh.tokenizer import merge_sentencepiece

    extra = Path(__file__).resolve().parent.parent / "fixtures/chinese_llama/chinese_sp.model"
    merged = merge_sentencepiece(llama2_model_path, extra, scores="seed")
    hf = _load(export_hf_tokenizer(merged, tmp_path / "published", pad_token="<unk>"))
    sp = spm.SentencePieceProcessor(model_proto=merged.proto.SerializeToString())
    lines = corpus_lines["zh_d2l"]
    bad, _ = _agree(hf, sp, lines)
    assert not bad, f"{len(bad)} of {len(lines)} lines differ"
    assert len(hf) == 49953 and (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)


def test_directory_contents(merged_rank, tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    out = export_hf_tokenizer(merged_rank, tmp_path / "tok", chat_template=template)
    assert sorted(p.name for p in out.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    assert (out / "tokenizer.model").read_bytes() == merged_rank.proto.SerializeToString()
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    hf = _load(out)
    assert len(hf) == merged_rank.final_size
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.pad_token_id) == (1, 2, 0, None)
    assert hf.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False) == "你好"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_pad_token(llama2_model_path, tmp_path):
    from llamazh.tokenizer import merge_sentencepiece

    padded = merge_sentencepiece(llama2_model_path, llama2_model_path, pad_to_multiple=96)
    out = export_hf_tokenizer(padded, tmp_path / "tok", pad_token="<unused_0>")
    hf = _load(out)
    assert hf.pad_token == "<unused_0>" and hf.pad_token_id == 32000
    assert len(hf) == 32064
    with pytest.raises(ValueError, match="pad_token='<pad>' is not a piece"):
        export_hf_tokenizer(padded, tmp_path / "other", pad_token="<pad>")
    assert not (tmp_path / "other").exists()


def test_existing_and_interrupted_exports_leave_nothing(merged_rank, tmp_path, monkeypatch):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "mine.txt").write_text("keep", encoding="utf-8")
    with pytest.raises(FileExistsError, match="out_dir="):
        export_hf_tokenizer(merged_rank, out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]

    import llamazh.tokenizer.export as export_module

    def boom(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "_write_json", lambda *a: boom(a))
    with pytest.raises(KeyboardInterrupt):
        export_hf_tokenizer(merged_rank, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_bad_model(tmp_path, corpus_path):
    with pytest.raises(ValueError, match=r"model=.*not a SentencePiece model"):
        export_hf_tokenizer(corpus_path("zh_d2l.txt"), tmp_path / "x")
    assert not (tmp_path / "x").exists()
