"""export_gguf against an independent reader: transformers' GGUF loading must reproduce the
tokenizer's ids and the model's logits (f32: float error; f16: the error of f16 weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llamazh.testing import assert_close

gguf = pytest.importorskip("gguf", reason="export_gguf needs gguf: pip install 'llamazh[real]'")

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TEXTS = [
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "The quick brown fox jumps over the lazy dog.",
    "emoji 🙂🚀 mixed with 中文 and English",
]


def _tiny(vocab: int, *, tied: bool, rope: dict | None = None):
    from llamazh.testing import tiny_llama

    extra = {} if rope is None else {"rope_parameters": {"rope_theta": 10000.0, **rope}}
    model = tiny_llama(
        seed=0, vocab_size=vocab, tie_word_embeddings=tied, rms_norm_eps=1e-5, **extra
    )
    with torch.no_grad():  # non-trivial norms, so that a misplaced norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _model_dir(tmp_path: Path, tokenizer_dir: Path, *, tied: bool, **kw) -> tuple[Path, object]:
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    model = _tiny(vocab, tied=tied, **kw)
    out = tmp_path / "model"
    model.save_pretrained(str(out))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out, model


def _read_back(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _f16_rounded(model):
    import copy

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    return rounded


@pytest.mark.slow
@pytest.mark.parametrize(("tied", "dtype"), [(True, "f32"), (False, "f16")])
def test_bytelevel_round_trip_through_transformers(tmp_path, tied, dtype):
    from transformers import AutoTokenizer

    from llamazh import export_gguf

    src, model = _model_dir(tmp_path, FIXTURES / "smollm2_tokenizer", tied=tied)
    tok = AutoTokenizer.from_pretrained(str(src))
    ids = torch.tensor([tok(TEXTS[0] + TEXTS[1]).input_ids])
    reference = model.double()(ids).logits
    model.float()
    path = export_gguf(src, tmp_path / "gguf" / f"m.{dtype}.gguf", dtype=dtype)
    back, back_tok = _read_back(path)
    for text in TEXTS:
        assert back_tok(text).input_ids == tok(text).input_ids, text
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tied
    baseline = (model if dtype == "f32" else _f16_rounded(model))(ids).logits
    assert_close(back(ids).logits, reference, baseline, name=f"{dtype} gguf logits")
    reader = gguf.GGUFReader(str(path))
    fields = {k: reader.fields[k].contents() for k in reader.fields if k.startswith("tokenizer")}
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"  # SmolLM2 splits by GPT-2's regex
    assert fields["tokenizer.chat_template"] == tok.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) != tied
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == dtype.upper()


def test_rotary_layout_is_transformers_inverse():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from llamazh.deploy import to_ggml_rotary_layout

    w = torch.arange(2 * 3 * 8 * 5, dtype=torch.float32).reshape(2 * 8 * 3, 5)
    ggml = to_ggml_rotary_layout(w, 3)
    back = LlamaTensorProcessor()._reverse_permute_weights(ggml.numpy(), 3, 3)
    assert torch.equal(torch.from_numpy(back), w) and not torch.equal(ggml, w)


def test_q8_0_and_bf16_weights(tmp_path):
    from gguf.quants import dequantize

    from llamazh import export_gguf

    src, model = _model_dir(tmp_path, FIXTURES / "smollm2_tokenizer", tied=True)
    embed = model.model.embed_tokens.weight.detach()
    down = model.model.layers[1].mlp.down_proj.weight.detach()
    for dtype, qtype, rel in (("q8_0", "Q8_0", 1 / 127), ("bf16", "BF16", 2**-8)):
        reader = gguf.GGUFReader(str(export_gguf(src, tmp_path / f"m.{dtype}.gguf", dtype=dtype)))
        tensors = {t.name: t for t in reader.tensors}
        assert tensors["output_norm.weight"].tensor_type.name == "F32"
        for name, original in (("token_embd.weight", embed), ("blk.1.ffn_down.weight", down)):
            t = tensors[name]
            assert t.tensor_type.name == qtype
            values = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).reshape(
                original.shape
            )
            err = (values - original).abs().max().item()
            assert err <= rel * original.abs().max().item(), (name, err)


@pytest.mark.slow
def test_extended_vocabulary_round_trip(tmp_path):
    """An extend_bpe vocabulary (300 new tokens): same pre-tokenizer name, ids through GGUF."""
    from transformers import AutoTokenizer

    from llamazh import export_gguf
    from llamazh.deploy import pre_tokenizer_name
    from llamazh.tokenizer import chinese_held_out_split, extend_bpe

    lines = chinese_held_out_split().train[:1500]
    ext = extend_bpe(FIXTURES / "smollm2_tokenizer", lines, new_tokens=300)
    tok_dir = ext.save(tmp_path / "tok")
    src, _ = _model_dir(tmp_path, tok_dir, tied=True)
    path = export_gguf(src, tmp_path / "gguf" / "zh.gguf", dtype="f16")
    back_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = AutoTokenizer.from_pretrained(str(src))
    for text in TEXTS:
        assert back_tok(text).input_ids == tok(text).input_ids, text
    spec = json.loads((tok_dir / "tokenizer.json").read_text())["pre_tokenizer"]
    assert pre_tokenizer_name(spec) == "gpt-2"
    assert len(tok(TEXTS[0]).input_ids) < len(
        AutoTokenizer.from_pretrained(str(FIXTURES / "smollm2_tokenizer"))(TEXTS[0]).input_ids
    )


@pytest.mark.parametrize("scores", ["seed", "rank"])  # SentencePieceBackend / fast export
def test_sentencepiece_vocabulary_with_added_pad(tmp_path, llama2_model_path, scores):
    """A merge + added [PAD] (Chinese-Alpaca's 49,954): pieces, scores, types, specials."""
    from transformers import AutoTokenizer

    from llamazh import export_gguf
    from llamazh.tokenizer import export_hf_tokenizer, merge_sentencepiece, save_tokenizer

    extra = FIXTURES / "chinese_llama/chinese_sp.model"
    merged = merge_sentencepiece(llama2_model_path, extra, scores=scores)
    tok = AutoTokenizer.from_pretrained(str(export_hf_tokenizer(merged, tmp_path / "zh")))
    assert tok.is_fast == (scores == "rank")
    tok.add_special_tokens({"pad_token": "[PAD]"})
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    save_tokenizer(tok, tmp_path / "alpaca")
    src, _ = _model_dir(tmp_path, tmp_path / "alpaca", tied=False)
    path = export_gguf(src, tmp_path / "gguf" / "alpaca.gguf", dtype="f16")
    reader = gguf.GGUFReader(str(path))
    field = {k: reader.fields[k].contents() for k in reader.fields}
    tokens = field["tokenizer.ggml.tokens"]
    assert len(tokens) == 49954 == field["llama.vocab_size"]
    assert tokens[:49953] == [p.piece for p in merged.proto.pieces]
    assert tokens[49953] == "[PAD]" and field["tokenizer.ggml.token_type"][49953] == 3
    scores = field["tokenizer.ggml.scores"]
    assert scores[:49953] == pytest.approx([p.score for p in merged.proto.pieces])
    assert field["tokenizer.ggml.model"] == "llama"
    assert field["tokenizer.ggml.add_bos_token"] is True
    assert field["tokenizer.ggml.add_space_prefix"] is True
    assert (field["tokenizer.ggml.bos_token_id"], field["tokenizer.ggml.padding_token_id"]) == (
        1,
        49953,
    )
    assert field["tokenizer.chat_template"] == tok.chat_template


@pytest.mark.parametrize(
    ("rope", "keys"),
    [
        ({"rope_type": "linear", "factor": 4.0}, {"type": "linear", "factor": 4.0}),
        (
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
            {"type": "yarn", "factor": 4.0, "original_context_length": 64},
        ),
    ],
)
def test_rope_scaling_keys(tmp_path, rope, keys):
    from llamazh import export_gguf

    src, _ = _model_dir(tmp_path, FIXTURES / "smollm2_tokenizer", tied=True, rope=rope)
    reader = gguf.GGUFReader(str(export_gguf(src, tmp_path / "m.gguf", dtype="f32")))
    for key, value in keys.items():
        assert reader.fields[f"llama.rope.scaling.{key}"].contents() == value


def test_bad_input_is_refused_before_writing(tmp_path, monkeypatch):
    from llamazh import export_gguf

    src, _ = _model_dir(tmp_path, FIXTURES / "smollm2_tokenizer", tied=True)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="dtype"):
        export_gguf(src, out / "m.gguf", dtype="q4_k")
    (out / "exists.gguf").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="out_path="):
        export_gguf(src, out / "exists.gguf")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    with pytest.raises(ValueError, match="'qwen2' model"):
        export_gguf(src, out / "m.gguf")
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (src / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
    with pytest.raises(ValueError, match="rope_type"):
        export_gguf(src, out / "m.gguf")
    (src / "config.json").write_text(json.dumps(config))
    spec = json.loads((src / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (src / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="pre-tokenizer"):
        export_gguf(src, out / "m.gguf")
    shutil.copy(FIXTURES / "smollm2_tokenizer" / "tokenizer.json", src / "tokenizer.json")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    tok.add_tokens(["<new_token>"])
    tok.save_pretrained(str(src))  # 49,153 tokens, 49,152 embedding rows
    with pytest.raises(ValueError, match="49153 tokens but the model has 49152 embedding rows"):
        export_gguf(src, out / "m.gguf")
    assert sorted(p.name for p in out.iterdir()) == ["exists.gguf"]


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    from llamazh import export_gguf

    src, _ = _model_dir(tmp_path, FIXTURES / "smollm2_tokenizer", tied=True)
    out = tmp_path / "out"

    def boom(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(src, out / "m.gguf")
    assert list(out.iterdir()) == []
