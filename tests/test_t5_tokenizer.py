"""T5's tokenizer: a sentencepiece Unigram model trained here on the repository's own text
(conftest.write_tiny_t5_tokenizer), read from spiece.model and from the tokenizer.json
transformers saves, against transformers' T5Tokenizer (the oracle) and sentencepiece itself."""
from __future__ import annotations

import pytest
from conftest import write_tiny_t5_tokenizer

sentencepiece = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

from engine.gguf_vocab import CONTROL, _sentencepiece_proto_facts  # noqa: E402
from engine.tokenizer import IncrementalDetokenizer, Tokenizer  # noqa: E402

EXTRA_IDS = 10
TEXTS = [
    "The river watches the garden near the old station.",
    "translate English to German: the teacher reads a letter",
    "Hello <extra_id_0> world <extra_id_9>!",
    "<extra_id_3>the bridge<extra_id_2> crosses</s> the valley",
    "  leading   spaces and\ttabs\nand newlines \r\n ",
    "Café naïve résumé ＡＢＣ ① ﬁ ½",                       # NFKC: full-width, circled, ligature
    "unknown letters zqxj 日本語 😀",
    "numbers 1234567890 3.14159",
    "",
]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("t5_spm")
    write_tiny_t5_tokenizer(directory, extra_ids=EXTRA_IDS)
    return directory


@pytest.fixture(scope="module")
def reference(t5_dir):
    """transformers' T5Tokenizer for the trained model. transformers reads spiece.model only
    through protobuf, which is not installed, so what its sentencepiece extractor would read
    (pieces and scores, the control pieces, the precompiled charsmap) is handed over as it
    would be, through T5's converter."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import T5Converter
    processor = sentencepiece.SentencePieceProcessor(model_file=str(t5_dir / "spiece.model"))
    facts = _sentencepiece_proto_facts(processor.serialized_model_proto())
    n = processor.get_piece_size()
    kwargs = T5Converter.convert_from_spm(
        vocab=[(processor.id_to_piece(i), processor.get_score(i)) for i in range(n)],
        _spm_precompiled_charsmap=facts["precompiled_charsmap"], extra_ids=EXTRA_IDS,
        additional_special_tokens=[AddedToken(processor.id_to_piece(i), normalized=False, special=True)
                                   for i in range(n) if facts["piece_types"][i] == CONTROL])
    return transformers.T5Tokenizer(**kwargs)


@pytest.fixture(scope="module", params=["spiece.model", "tokenizer.json"])
def pair(request, t5_dir, reference, tmp_path_factory):
    if request.param == "spiece.model":
        return Tokenizer.from_dir(t5_dir), reference
    saved = tmp_path_factory.mktemp("t5_json")
    reference.save_pretrained(saved)
    assert (saved / "tokenizer.json").is_file() and not (saved / "spiece.model").exists()
    return Tokenizer.from_dir(saved), reference


def test_the_precompiled_normalizer_is_read(t5_dir):
    processor = sentencepiece.SentencePieceProcessor(model_file=str(t5_dir / "spiece.model"))
    assert len(_sentencepiece_proto_facts(processor.serialized_model_proto())["precompiled_charsmap"]) > 1000


@pytest.mark.parametrize("text", TEXTS)
def test_ids_and_text_round_trip_as_transformers(pair, text):
    ours, reference = pair
    ids = ours.encode(text)
    assert ids == reference(text).input_ids
    assert ids[-1] == reference.eos_token_id                    # </s> appended, no BOS
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids)
    assert ours.encode(text, add_special_tokens=False) == reference(text, add_special_tokens=False).input_ids


def test_sentinels_sit_at_the_top_of_the_vocabulary_in_reverse(pair, t5_dir):
    ours, reference = pair
    size = ours.vocab_size
    processor = sentencepiece.SentencePieceProcessor(model_file=str(t5_dir / "spiece.model"))
    assert size == len(reference) == processor.get_piece_size() + EXTRA_IDS
    for i in range(EXTRA_IDS):
        token = f"<extra_id_{i}>"
        assert ours.token_to_id(token) == reference.convert_tokens_to_ids(token) == size - 1 - i
        assert ours.is_special(size - 1 - i)
    assert (ours.eos_token_id, ours.pad_token_id) == (1, 0) == (reference.eos_token_id, reference.pad_token_id)
    assert ours.eos_token_ids == (1,)


def test_plain_text_ids_are_sentencepiece_s_own(t5_dir):
    """A second oracle: on text with single spaces, sentencepiece's own encoding (plus </s>)."""
    ours = Tokenizer.from_dir(t5_dir)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(t5_dir / "spiece.model"))
    for text in TEXTS[:2] + TEXTS[5:8]:
        assert ours.encode(text) == processor.encode(text) + [processor.eos_id()], text


def test_stream_of_a_generation_equals_its_one_shot_decode(t5_dir, reference):
    """Generated ids decoded token by token after the decoder's start token (<pad>): the text
    transformers' decode(generated, skip_special_tokens=True) gives, first word unspaced."""
    ours = Tokenizer.from_dir(t5_dir)
    for text in TEXTS:
        generated = ours.encode(text)
        stream = IncrementalDetokenizer(ours, [0])
        pieces = [stream.push(i) for i in generated] + [stream.flush()]
        assert "".join(pieces) == reference.decode(generated, skip_special_tokens=True), text
