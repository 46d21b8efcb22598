"""The converted folder's tokenizer.json + chat template against the official tokenizer and openai_api.py.

Built from the real 1 MB tokenizer.model, loaded the way engines load it (transformers' AutoTokenizer
with no remote code, and the `tokenizers` library alone), and compared on a wide generated corpus
(tests/runtime/tokenizer_corpus.py) with the official ChatGLMTokenizer's ids:

- raw text: `tokenizer(text)` == official build_inputs_with_special_tokens(ids) ([gMASK, sop] + ids);
- chat: `apply_chat_template(messages, tokenize=True, add_generation_prompt=True)` == the official ids of
  build_prompt(query, history), with (query, history) taken by the official openai_api.py itself;
- render-then-encode (vLLM): `tokenizer(apply_chat_template(..., tokenize=False), add_special_tokens=False)`.
"""
from __future__ import annotations

import pytest

from glmsetup.runtime.engine_files import ENGINE_CONTROLS, ENGINE_SPECIALS, fast_matches, write_tokenizer_files
from glmsetup.runtime.tokenizer import ChatGLM2Tokenizer

from . import tokenizer_corpus as corpus
from .upstream import (REAL_TOKENIZER, needs_upstream, official_chat_ids, official_ids, official_query_history,
                       official_tokenizer)

pytestmark = [needs_upstream, pytest.mark.slow]
GMASK, SOP, EOP = 64790, 64792, 64793


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    dest = tmp_path_factory.mktemp("engine-tokenizer")
    info = write_tokenizer_files(REAL_TOKENIZER, dest)
    assert info == {"engine_tokenizer": True}
    return dest


@pytest.fixture(scope="module")
def fast(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)  # no trust_remote_code


@pytest.fixture(scope="module")
def official():
    return official_tokenizer()


@pytest.fixture(scope="module")
def texts():
    return corpus.texts()


def _ids(encoded) -> list[int]:
    return [int(i) for i in (encoded["input_ids"] if hasattr(encoded, "keys") else encoded)]


def test_the_files_load_without_remote_code(folder, fast):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert raw.encode("people").ids == [GMASK, SOP, 705]
    assert type(fast).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    assert (fast.eos_token_id, fast.pad_token_id, fast.unk_token_id) == (2, 0, 0)
    assert fast.padding_side == "left" and fast.model_max_length == 32768


def test_raw_text_gives_the_official_ids(fast, official, texts):
    native = ChatGLM2Tokenizer(REAL_TOKENIZER)
    bad = [t for t in texts if _ids(fast(t)) != official_ids(official, t)]
    assert not bad, f"{len(bad)} of {len(texts)} texts differ, e.g. {bad[:3]!r}"
    bad = [t for t in texts if _ids(fast(t, add_special_tokens=False)) != official_ids(official, t, False)]
    assert not bad, f"{len(bad)} of {len(texts)} texts differ without specials, e.g. {bad[:3]!r}"
    bad = [t for t in texts if native.encode(t) != official_ids(official, t)]
    assert not bad, f"glmsetup's own tokenizer differs on {len(bad)} texts, e.g. {bad[:3]!r}"
    assert len(texts) > 1000


def test_special_spellings_in_text_stay_plain_text(fast):
    for text in ("people", "Aesop", "philosophy", "geopolitics", "a </s> b", "<unk>", "[gMASK]sop", "eop sop"):
        ids = _ids(fast(text, add_special_tokens=False))
        assert not set(ids) & {0, 1, 2, 64789, GMASK, 64791, SOP, EOP}, (text, ids)
        assert fast.decode(ids) == text


def test_pairs_like_the_official_tokenizer(fast, official):
    for a, b in [("问题", "答案"), ("people", "</s> sop"), ("", "x")]:
        want = official.build_inputs_with_special_tokens(official_ids(official, a, False), official_ids(official, b, False))
        assert _ids(fast(a, b)) == want


def test_decoding_matches_the_official_decoder(fast, official, texts):
    bad = []
    for text in texts[::3]:
        ids = official_ids(official, text)
        if fast.decode(ids, skip_special_tokens=True) != official.decode(ids):
            bad.append(text)
    assert not bad, f"{len(bad)} decodes differ, e.g. {bad[:3]!r}"


def test_chat_template_gives_the_official_ids(fast, official):
    conversations = corpus.conversations()
    bad_template, bad_render = [], []
    for messages in conversations:
        want = official_chat_ids(official, messages)
        if _ids(fast.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)) != want:
            bad_template.append(messages)
        text = fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if _ids(fast(text, add_special_tokens=False)) != want:
            bad_render.append(messages)
    assert not bad_template, f"{len(bad_template)} of {len(conversations)} differ, e.g. {bad_template[:2]!r}"
    assert not bad_render, f"{len(bad_render)} of {len(conversations)} differ after rendering, e.g. {bad_render[:2]!r}"


def test_the_special_shapes_of_openai_api(fast, official):
    """A system message not first, consecutive user messages, an odd number of earlier messages."""
    cases = [
        [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "system", "content": "s1"}, {"role": "system", "content": "s2"}, {"role": "user", "content": "q"}],
        [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
         {"role": "assistant", "content": "a2"}, {"role": "user", "content": "u2"}, {"role": "user", "content": "q"}],
    ]
    for messages in cases:
        query, history = official_query_history(messages)
        rendered = fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == ENGINE_SPECIALS["[gMASK]"] + ENGINE_SPECIALS["sop"] + official.build_prompt(query, history)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}, {"role": "user", "content": "q"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    [{"role": "system", "content": "only a system message"}],
])
def test_what_the_official_server_refuses_the_template_refuses(fast, messages):
    with pytest.raises(ValueError, match="refused"):
        official_query_history(messages)
    with pytest.raises(Exception, match="roles|last message"):
        fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_without_a_generation_prompt(fast, official):
    asked = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "你好"}]
    with_prompt = fast.apply_chat_template(asked, tokenize=False, add_generation_prompt=True)
    assert fast.apply_chat_template(asked, tokenize=False, add_generation_prompt=False) + "\n\n答：" == with_prompt
    # Ending with an answer: the conversation as the history the next request carries.
    answered = asked + [{"role": "assistant", "content": "你好👋"}]
    rendered = fast.apply_chat_template(answered, tokenize=False, add_generation_prompt=False)
    following = answered + [{"role": "user", "content": "1+1?"}]
    assert fast.apply_chat_template(following, tokenize=False, add_generation_prompt=True).startswith(rendered)
    assert rendered.endswith("答：你好👋\n\n") and "Be brief." not in rendered  # openai_api.py drops it from history


def test_the_self_check_catches_a_tokenizer_that_matches_eop_inside_words(folder):
    from transformers import AutoTokenizer

    broken = AutoTokenizer.from_pretrained(folder)
    broken.add_tokens(["sop", "eop"], special_tokens=True)
    assert broken("people", add_special_tokens=False)["input_ids"] != [705]
    assert not fast_matches(ChatGLM2Tokenizer(REAL_TOKENIZER), broken)
    assert fast_matches(ChatGLM2Tokenizer(REAL_TOKENIZER), AutoTokenizer.from_pretrained(folder))


def test_engine_spellings_are_not_in_the_vocabulary():
    native = ChatGLM2Tokenizer(REAL_TOKENIZER)
    vocab = {native.sp.id_to_piece(i) for i in range(native.sp.vocab_size())}
    assert not vocab & (set(ENGINE_SPECIALS.values()) | set(ENGINE_CONTROLS.values()))


def test_a_piece_spelled_like_a_special_token(tmp_path):
    """The official tokenizer maps pieces to ids by name: a piece "sop" gets the special id. glmsetup's
    tokenizer does the same; tokenizer.json cannot say it, so convert leaves it out and says why."""
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["Aesop sop people 你好"] * 20 + corpus.ENGLISH * 5),
                                   model_writer=buf, model_type="bpe", vocab_size=400, byte_fallback=True,
                                   user_defined_symbols=["sop"], normalization_rule_name="identity",
                                   hard_vocab_limit=False, minloglevel=2)
    model_file = tmp_path / "tokenizer.model"
    model_file.write_bytes(buf.getvalue())
    official = official_tokenizer(str(model_file))
    native = ChatGLM2Tokenizer(model_file)
    for text in ("Aesop sop people", "sop", "people"):
        assert native.encode(text) == official_ids(official, text)
    assert native.get_command("sop") in native.encode("Aesop")
    out = tmp_path / "out"
    out.mkdir()
    info = write_tokenizer_files(model_file, out)
    assert info["engine_tokenizer"] is False and "'sop'" in info["reason"]
    assert (out / "tokenizer.model").is_file() and not (out / "tokenizer.json").exists()
