"""SEED-X vocabulary (src/models/vocab.py): token extension, embedding init and image-token layout."""

from pathlib import Path

import pytest
import torch

from src.models.vocab import (
    IMG_START,
    NUM_IMG_TOKENS_USED,
    NUM_SEEDX_TOKENS,
    PATCH_END,
    SEEDX_TOKENS,
    add_seedx_tokens,
    image_sequence_text,
    image_span_text,
    image_token_ids,
    init_new_embeddings,
)

pytestmark = pytest.mark.unit

TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tokenizers" / "tiny-llama"


@pytest.fixture
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_TOKENIZER)


def test_token_list_order_and_count():
    assert NUM_SEEDX_TOKENS == 330 == 32330 - 32000
    assert SEEDX_TOKENS[:4] == ("<img>", "</img>", "<patch>", "</patch>")
    assert SEEDX_TOKENS[4] == "<img_00000>" and SEEDX_TOKENS[103] == "<img_00099>"
    assert SEEDX_TOKENS[104] == "<loc-0>" and SEEDX_TOKENS[327] == "<loc-223>"
    assert SEEDX_TOKENS[-2:] == ("<box_start>", "<box_end>")
    assert len(set(SEEDX_TOKENS)) == 330


def test_tiny_tokenizer_is_llama_like(tokenizer):
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    ids = tokenizer("a dog on the beach").input_ids
    assert ids[0] == 1 and ids[-1] != 2  # BOS added, EOS not (like Llama-2)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a dog on the beach"
    text = "naïve 🙂"  # byte fallback: nothing becomes <unk>
    assert 0 not in tokenizer(text).input_ids
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    assert sum(p.stat().st_size for p in TINY_TOKENIZER.iterdir()) < 200 * 1024


def test_add_tokens_grows_vocab_by_330_and_is_idempotent(tokenizer):
    old = len(tokenizer)
    assert add_seedx_tokens(tokenizer) == 330
    assert len(tokenizer) == old + 330
    assert add_seedx_tokens(tokenizer) == 0
    assert len(tokenizer) == old + 330
    # Fixed order -> consecutive new ids.
    assert tokenizer.convert_tokens_to_ids(list(SEEDX_TOKENS)) == list(range(old, old + 330))


def test_each_token_is_a_single_id_and_never_split(tokenizer):
    add_seedx_tokens(tokenizer)
    vocab = tokenizer.get_vocab()
    for token in SEEDX_TOKENS:
        assert tokenizer.encode(token, add_special_tokens=False) == [vocab[token]]
    # Glued to text and to each other they still come out whole.
    text = "see<img_00007><loc-12>x<box_end>"
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))
    assert [p for p in pieces if p.startswith("<") and p.endswith(">")] == [
        "<img_00007>",
        "<loc-12>",
        "<box_end>",
    ]
    # Box tokens survive decoding with skip_special_tokens (they are not "special").
    box = "<box_start><loc-1><loc-2><loc-3><loc-4><box_end>"
    assert box in tokenizer.decode(tokenizer.encode(box), skip_special_tokens=True)


def test_image_token_ids(tokenizer):
    with pytest.raises(ValueError, match="tokenizer"):
        image_token_ids(tokenizer)
    add_seedx_tokens(tokenizer)
    ids = image_token_ids(tokenizer)
    assert ids.img_start == tokenizer.convert_tokens_to_ids(IMG_START)
    assert ids.patch_end == tokenizer.convert_tokens_to_ids(PATCH_END)
    assert len(ids.img) == 100 and len(ids.loc) == 224
    assert ids.img[63] == tokenizer.convert_tokens_to_ids("<img_00063>")
    assert ids.box_end == len(tokenizer) - 1


def test_image_span_text():
    span = image_span_text("patch")
    assert span.startswith("<patch><img_00000><img_00001>") and span.endswith("<img_00063></patch>")
    assert image_span_text("img", 2) == "<img><img_00000><img_00001></img>"
    with pytest.raises(ValueError, match="kind"):
        image_span_text("tile")
    with pytest.raises(ValueError, match="n"):
        image_span_text("img", 101)


def test_image_sequence_layout_for_2x2(tokenizer):
    add_seedx_tokens(tokenizer)
    ids = image_token_ids(tokenizer)
    seq = tokenizer.encode(image_sequence_text(2, 2), add_special_tokens=False)
    assert len(seq) == 5 * (NUM_IMG_TOKENS_USED + 2)
    assert seq.count(ids.patch_start) == seq.count(ids.patch_end) == 4
    assert seq.count(ids.img_start) == seq.count(ids.img_end) == 1
    span = list(ids.img[:NUM_IMG_TOKENS_USED])
    for view in range(5):
        chunk = seq[view * 66 : (view + 1) * 66]
        start, end = (ids.img_start, ids.img_end) if view == 4 else (ids.patch_start, ids.patch_end)
        assert chunk == [start] + span + [end]


def test_one_by_one_has_one_tile_span_then_global():
    text = image_sequence_text(1, 1, n=3)
    assert text == (
        "<patch><img_00000><img_00001><img_00002></patch><img><img_00000><img_00001><img_00002></img>"
    )


def test_init_new_embeddings_mean_and_three_times_mean(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    old_vocab = len(tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=old_vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()

    add_seedx_tokens(tokenizer)
    model.resize_token_embeddings(len(tokenizer))
    init_new_embeddings(model, old_vocab)

    new_in = model.get_input_embeddings().weight
    new_out = model.get_output_embeddings().weight
    assert new_in.shape[0] == new_out.shape[0] == old_vocab + 330
    torch.testing.assert_close(new_in[:old_vocab], old_in)
    torch.testing.assert_close(new_out[:old_vocab], old_out)
    torch.testing.assert_close(new_in[old_vocab:], old_in.mean(0).expand(330, -1))
    torch.testing.assert_close(new_out[old_vocab:], 3 * old_out.mean(0).expand(330, -1))

    with pytest.raises(ValueError, match="old_vocab_size"):
        init_new_embeddings(model, old_vocab + 1000)


def test_init_new_embeddings_leaves_tied_head_alone():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    old_in = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(60)
    init_new_embeddings(model, 50)
    weight = model.get_input_embeddings().weight
    torch.testing.assert_close(weight[50:], old_in.mean(0).expand(10, -1))  # not tripled
    assert model.get_output_embeddings().weight.data_ptr() == weight.data_ptr()
