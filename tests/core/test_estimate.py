from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import pytest
import tiktoken
import tiktoken.load
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allowance import _estimate
from allowance._errors import ConfigurationError
from allowance._estimate import (
    ANTHROPIC_IMAGE_TOKENS,
    ANTHROPIC_TOOLS_TOKENS,
    DOCUMENT_TOKENS,
    MESSAGE_TOKENS,
    OPENAI_IMAGE_LOW_TOKENS,
    OPENAI_IMAGE_TOKENS,
    OPENAI_TOOLS_TOKENS,
    REQUEST_TOKENS,
    SCHEMA_TOKENS,
    TOOL_TOKENS,
    chat_input_bound,
    default_output_cap,
    estimate,
    exact_input_tokens,
    messages_input_bound,
    output_cap,
    responses_input_bound,
)
from allowance.typing import CallRecord, Estimate, Usage

O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"

# -- a real byte-level BPE, built here (no encoding file can be downloaded) ----

# The GPT-2 split pattern; the merges below make multi-byte tokens for English,
# code, Cyrillic, CJK and emoji, so texts really do merge.
PAT_STR = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
WORDS = [
    " the", " and", " of", " to", "ing", "tion", " in", " is", " that", "er", "th",
    "def", " return", "    ", "        ", "()", "):", " =", "==", "self", "import",
    " при", "вет", "日本", "日本語", "の", "テキスト", "絵文字", "🙂", "🙂🙂", " 😀",
    "中文", "字", "é", "ü", "ß", "\n\n", "\n",
]  # fmt: skip


def _fake_ranks() -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    for word in WORDS:
        data = word.encode()
        for end in range(2, len(data) + 1):  # every prefix, so each merge is reachable
            ranks.setdefault(data[:end], len(ranks))
    return ranks


FAKE_RANKS = _fake_ranks()
FAKE = tiktoken.Encoding(
    "allowance_test_bpe",
    pat_str=PAT_STR,
    mergeable_ranks=FAKE_RANKS,
    special_tokens={"<|endoftext|>": len(FAKE_RANKS)},
)


def _fake_file() -> bytes:
    lines = [
        base64.b64encode(token) + b" " + str(rank).encode()
        for token, rank in sorted(FAKE_RANKS.items(), key=lambda item: item[1])
    ]
    return b"\n".join(lines) + b"\n"


@pytest.fixture(autouse=True)
def empty_tiktoken_cache(tmp_path, monkeypatch):
    """Every test starts with an empty tiktoken cache and no loaded encoding."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    monkeypatch.setattr(_estimate, "_loaded", {})
    return cache


@pytest.fixture
def no_download(monkeypatch):
    """Record any attempt of tiktoken to read a blob or build a registry encoding."""
    attempts: list[str] = []

    def read_file(blobpath):
        attempts.append(blobpath)
        msg = f"tiktoken tried to read {blobpath}"
        raise AssertionError(msg)

    def get_encoding(name):
        attempts.append(name)
        msg = f"tiktoken.get_encoding({name!r}) was called"
        raise AssertionError(msg)

    monkeypatch.setattr(tiktoken.load, "read_file", read_file)
    monkeypatch.setattr(tiktoken, "get_encoding", get_encoding)
    return attempts


@pytest.fixture
def fake_encoding(empty_tiktoken_cache, monkeypatch):
    """Serve FAKE for models named ``test-model*``, from a file in tiktoken's cache."""
    url = "https://example.invalid/encodings/allowance_test_bpe.tiktoken"
    data = _fake_file()
    cache_file = empty_tiktoken_cache / hashlib.sha1(url.encode()).hexdigest()  # noqa: S324
    cache_file.write_bytes(data)
    builds: list[str] = []

    def build(path: str) -> tiktoken.Encoding:
        builds.append(path)
        ranks = {}
        for line in Path(path).read_bytes().splitlines():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        return tiktoken.Encoding(
            "allowance_test_bpe",
            pat_str=PAT_STR,
            mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": len(ranks)},
        )

    files = dict(_estimate._ENCODING_FILES)
    files["allowance_test_bpe"] = _estimate._EncodingFile(
        url, hashlib.sha256(data).hexdigest(), build
    )
    monkeypatch.setattr(_estimate, "_ENCODING_FILES", files)
    monkeypatch.setattr(
        _estimate,
        "_ENCODING_BY_PREFIX",
        [("test-model", "allowance_test_bpe"), *_estimate._ENCODING_BY_PREFIX],
    )
    return builds


def test_the_fake_tokenizer_really_merges():
    for text in ("the quick test of the things", "日本語のテキスト", "🙂🙂 def f():"):
        assert len(FAKE.encode_ordinary(text)) < len(text.encode())
        assert FAKE.decode(FAKE.encode_ordinary(text)) == text


# -- the bound is never below a byte-level BPE count ---------------------------

# The fixtures hold the same cache and encoding for every example: safe to share.
FIXTURE_SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture],
}
TEXTS = st.one_of(
    st.text(),
    st.text(alphabet=st.characters(codec="utf-8")),
    st.text(
        alphabet=st.sampled_from(["日", "本", "語", "の", "🙂", "😀", "é", " ", "\n"])
    ),
    st.lists(st.sampled_from(WORDS)).map("".join),
    st.sampled_from(
        [
            "def f(self):\n    return self.x == 1\n",
            "Привет, мир! Как дела?",
            "日本語のテキスト、絵文字🙂も含む。",
            "👨‍👩‍👧‍👦 family emoji and ZWJ",
            "\t\t  \n\n\n   ",
        ]
    ),
)


@settings(**FIXTURE_SETTINGS, max_examples=300)
@given(text=TEXTS)
def test_utf8_bound_is_at_least_the_bpe_count(text):
    assert _estimate._utf8_len(text) >= len(FAKE.encode_ordinary(text))
    assert _estimate._utf8_len(text) == len(text.encode("utf-8", "surrogatepass"))


@settings(**FIXTURE_SETTINGS, max_examples=200)
@given(texts=st.lists(TEXTS, min_size=1, max_size=5))
def test_chat_bound_is_at_least_the_exact_count(fake_encoding, texts):
    body = {
        "model": "test-model",
        "messages": [{"role": "user", "content": t} for t in texts],
        "tools": [
            {"type": "function", "function": {"name": "f", "description": texts[0]}}
        ],
    }
    exact = exact_input_tokens("openai", "test-model", body)
    assert exact is not None
    assert chat_input_bound(body) >= exact


@settings(**FIXTURE_SETTINGS, max_examples=100)
@given(texts=st.lists(TEXTS, min_size=1, max_size=5))
def test_responses_bound_is_at_least_the_exact_count(fake_encoding, texts):
    body = {
        "model": "test-model",
        "instructions": texts[0],
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": t}]}
            for t in texts
        ],
        "text": {
            "format": {"type": "json_schema", "schema": {"description": texts[-1]}}
        },
    }
    exact = exact_input_tokens("openai", "test-model", body)
    assert exact is not None
    assert responses_input_bound(body) >= exact


# -- exact counting: offline only ----------------------------------------------


def test_exact_count_is_text_tokens_plus_the_same_framing(fake_encoding):
    text = "the quick test of the things, 日本語🙂"
    body = {"model": "test-model", "messages": [{"role": "user", "content": text}]}
    expected = REQUEST_TOKENS + MESSAGE_TOKENS + len(FAKE.encode_ordinary(text))
    assert exact_input_tokens("openai", "test-model", body) == expected
    assert chat_input_bound(body) == REQUEST_TOKENS + MESSAGE_TOKENS + len(
        text.encode()
    )
    responses = {"model": "test-model", "input": text}
    assert exact_input_tokens("azure", "test-model", responses) == expected


def test_the_exact_count_takes_tools_at_their_bytes(fake_encoding):
    """OpenAI renders tools in a form of its own, which can take more tokens
    than their JSON (an enum of 3,000 values: 17,035 against 14,102): the
    exact path counts their bytes, as the bound does, never their JSON's
    tokens. Framing for a named message counts there too."""
    enum = [f"v{i}" for i in range(300)]
    tool = {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"v": {"type": "string", "enum": enum}}}}}  # fmt: skip
    plain = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}
    with_tool = {**plain, "tools": [tool]}
    exact_plain = exact_input_tokens("openai", "test-model", plain)
    exact_tool = exact_input_tokens("openai", "test-model", with_tool)
    assert exact_plain is not None
    assert exact_tool is not None
    assert exact_tool - exact_plain == (
        OPENAI_TOOLS_TOKENS + TOOL_TOKENS + len(json.dumps(tool))
    )
    named = {"model": "test-model",
             "messages": [{"role": "user", "name": "a", "content": "a"}]}  # fmt: skip
    assert exact_input_tokens("openai", "test-model", named) == REQUEST_TOKENS + 7


def test_exact_count_loads_the_encoding_once(fake_encoding):
    body = {"messages": [{"role": "user", "content": "hello"}]}
    for _ in range(5):
        assert exact_input_tokens("openai", "test-model-2", body) is not None
    assert len(fake_encoding) == 1


def test_empty_cache_gives_none_without_any_download(no_download):
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]}
    for model in ("gpt-4o", "gpt-4.1-mini", "o3", "gpt-5", "gpt-4", "gpt-3.5-turbo"):
        assert exact_input_tokens("openai", model, body) is None
    assert no_download == []


def test_disabled_cache_gives_none_without_any_download(no_download, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    body = {"messages": [{"role": "user", "content": "hello"}]}
    assert exact_input_tokens("openai", "gpt-4o", body) is None
    assert no_download == []


def test_corrupt_cached_file_is_left_alone(no_download, empty_tiktoken_cache):
    # tiktoken would delete a file with the wrong hash and download it again
    cached = empty_tiktoken_cache / hashlib.sha1(O200K_URL.encode()).hexdigest()  # noqa: S324
    cached.write_bytes(b"not an encoding\n")
    body = {"messages": [{"role": "user", "content": "hello"}]}
    assert exact_input_tokens("openai", "gpt-4o", body) is None
    assert cached.exists()
    assert no_download == []


def test_cache_dir_follows_tiktoken_rules(monkeypatch, tmp_path):
    name = hashlib.sha1(O200K_URL.encode()).hexdigest()  # noqa: S324
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path / "b"))
    assert _estimate._tiktoken_cache_path(O200K_URL) == str(tmp_path / "a" / name)
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    assert _estimate._tiktoken_cache_path(O200K_URL) == str(tmp_path / "b" / name)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert _estimate._tiktoken_cache_path(O200K_URL) == os.path.join(  # noqa: PTH118
        str(tmp_path / "tmp"), "data-gym-cache", name
    )


def test_registered_urls_and_hashes_match_tiktoken():
    source = Path(tiktoken.__file__).parent.parent / "tiktoken_ext" / "openai_public.py"
    text = source.read_text()
    for encoding in _estimate._ENCODING_FILES.values():
        assert encoding.url in text
        assert encoding.sha256 in text


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-5.1", "o200k_base"),
        ("o1", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("ft:gpt-4o:org::abc", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-oss-120b", None),
        ("claude-sonnet-4-5", None),
        ("llama-3-70b", None),
    ],
)
def test_model_families_map_to_encodings(model, encoding):
    assert _estimate._encoding_for(model) == encoding


def test_exact_count_is_none_where_no_local_tokenizer(fake_encoding):
    body = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}
    assert exact_input_tokens("anthropic", "test-model", body) is None
    assert exact_input_tokens("google", "test-model", body) is None
    assert exact_input_tokens("openai", "llama-3-70b", body) is None
    assert exact_input_tokens("openai", "test-model", {"prompt": "legacy"}) is None


def test_exact_count_never_raises(fake_encoding, monkeypatch):
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert (
        exact_input_tokens("openai", "test-model", {"messages": object()}) is not None
    )
    assert exact_input_tokens("openai", "test-model", "not a body") is None  # type: ignore[arg-type]

    def broken(path):
        msg = "cannot build"
        raise RuntimeError(msg)

    files = dict(_estimate._ENCODING_FILES)
    files["allowance_test_bpe"] = files["allowance_test_bpe"].__class__(
        files["allowance_test_bpe"].url, files["allowance_test_bpe"].sha256, broken
    )
    monkeypatch.setattr(_estimate, "_ENCODING_FILES", files)
    monkeypatch.setattr(_estimate, "_loaded", {})
    assert exact_input_tokens("openai", "test-model", body) is None


# -- what the bound counts -----------------------------------------------------


def _chat(*messages, **extra):
    return {"model": "gpt-4o", "messages": list(messages), **extra}


def test_chat_bound_counts_text_bytes_and_framing():
    body = _chat(
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "héllo"}], "name": "bob"},
    )
    # A named message counts 1 more (OpenAI's framing: 3 + role + 1 per name).
    expected = (
        REQUEST_TOKENS + 2 * MESSAGE_TOKENS + len("Be brief.") + 6 + len("bob") + 1
    )
    assert chat_input_bound(body) == expected


def test_chat_bound_counts_tool_calls_tools_and_schemas():
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "minimum": 0},
        },
    }
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"a": 1}}}
    body = _chat(
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        tools=[tool],
        response_format=schema,
    )
    expected = (
        REQUEST_TOKENS
        + 2 * MESSAGE_TOKENS
        + len("call_1" + "get_weather" + '{"city": "Paris"}')
        + len("call_1" + "sunny")
        + OPENAI_TOOLS_TOKENS
        + TOOL_TOKENS
        + len(json.dumps(tool))
        + SCHEMA_TOKENS
        + len(json.dumps(schema))
    )
    assert chat_input_bound(body) == expected
    assert chat_input_bound(_chat(functions=[tool["function"]])) > OPENAI_TOOLS_TOKENS


def test_media_count_figures_not_base64_bytes():
    image = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + "A" * 10**6},
    }
    low = {
        "type": "image_url",
        "image_url": {"url": "https://x/y.png", "detail": "low"},
    }
    pdf = {"type": "file", "file": {"file_data": "B" * 10**6, "filename": "a.pdf"}}
    base = REQUEST_TOKENS + MESSAGE_TOKENS
    assert chat_input_bound(_chat({"role": "user", "content": [image]})) == (
        base + OPENAI_IMAGE_TOKENS
    )
    assert chat_input_bound(_chat({"role": "user", "content": [low]})) == (
        base + OPENAI_IMAGE_LOW_TOKENS
    )
    assert chat_input_bound(_chat({"role": "user", "content": [pdf]})) == (
        base + DOCUMENT_TOKENS
    )
    mini = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [image]}]}
    assert chat_input_bound(mini) == base + 48_169
    nano = {"model": "gpt-4.1-nano", "messages": [{"role": "user", "content": [low]}]}
    assert chat_input_bound(nano) == base + 3_800


def test_audio_is_bounded_by_its_decoded_size():
    audio = {
        "type": "input_audio",
        "input_audio": {"data": "A" * 40_000, "format": "mp3"},
    }
    bound = chat_input_bound(_chat({"role": "user", "content": [audio]}))
    # 30 kB of audio at >= 8 kbit/s is <= 30 s, at <= 10 tokens/s
    assert bound == REQUEST_TOKENS + MESSAGE_TOKENS + 301


def test_parameters_are_not_prompt_but_unknown_strings_are():
    plain = chat_input_bound(_chat({"role": "user", "content": "hi"}))
    with_params = _chat(
        {"role": "user", "content": "hi"},
        user="someone-long-identifier",
        metadata={"k": "a long metadata value"},
        stop=["STOP"],
        temperature=0.2,
        max_tokens=100,
    )
    assert chat_input_bound(with_params) == plain
    unknown = _chat({"role": "user", "content": "hi"}, future_prompt_field="abcdef")
    assert chat_input_bound(unknown) == plain + 6


def test_responses_bound():
    body = {
        "model": "gpt-4.1",
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "hello"}]},
            {"type": "input_image", "image_url": "https://x/y.png", "detail": "high"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "done"},
        ],
        "tools": [{"type": "function", "name": "f", "parameters": {}}],
        "text": {"format": {"type": "json_schema", "schema": {}}},
        "max_output_tokens": 100,
        "reasoning": {"effort": "high"},
    }
    expected = (
        REQUEST_TOKENS
        + MESSAGE_TOKENS
        + len("Be brief.")
        + 4 * MESSAGE_TOKENS
        + len("hello")
        + OPENAI_IMAGE_TOKENS
        + len("c1" + "f" + "{}")
        + len("c1" + "done")
        + OPENAI_TOOLS_TOKENS
        + TOOL_TOKENS
        + len(json.dumps(body["tools"][0]))
        + SCHEMA_TOKENS
        + len(json.dumps(body["text"]["format"]))
    )
    assert responses_input_bound(body) == expected
    assert (
        responses_input_bound({"input": "héllo"}) == REQUEST_TOKENS + MESSAGE_TOKENS + 6
    )


def test_messages_bound():
    tool = {"name": "f", "input_schema": {"type": "object", "properties": {}}}
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "system": [
            {
                "type": "text",
                "text": "Be brief.",
                "cache_control": {"type": "ephemeral"},
            }
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "data": "A" * 10**6},
                    },
                    {
                        "type": "document",
                        "source": {"type": "base64", "data": "B" * 10**6},
                    },
                    {
                        "type": "document",
                        "source": {
                            "type": "text",
                            "media_type": "text/plain",
                            "data": "abc",
                        },
                        "title": "t",
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "S" * 500},
                    {
                        "type": "tool_use",
                        "id": "t1",
                        "name": "f",
                        "input": {"n": 12345},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "ok"}
                ],
            },
        ],
        "tools": [tool],
        "thinking": {"type": "enabled", "budget_tokens": 512},
    }
    expected = (
        REQUEST_TOKENS
        + MESSAGE_TOKENS
        + len("Be brief.")
        + 3 * MESSAGE_TOKENS
        + len("look")
        + ANTHROPIC_IMAGE_TOKENS
        + DOCUMENT_TOKENS
        + len("abc" + "t")
        + len("hmm")
        + len("t1" + "f")
        + len(json.dumps({"n": 12345}))
        + len("t1" + "ok")
        + ANTHROPIC_TOOLS_TOKENS
        + TOOL_TOKENS
        + len(json.dumps(tool))
    )
    assert messages_input_bound(body) == expected
    assert messages_input_bound({"system": "hi", "messages": []}) == (
        REQUEST_TOKENS + MESSAGE_TOKENS + 2
    )


def test_a_400_kb_prompt_is_bounded_by_its_bytes():
    text = "x" * 400_000
    assert chat_input_bound(_chat({"role": "user", "content": text})) == (
        REQUEST_TOKENS + MESSAGE_TOKENS + 400_000
    )
    cjk = "語" * 133_000
    assert messages_input_bound({"messages": [{"role": "user", "content": cjk}]}) == (
        REQUEST_TOKENS + MESSAGE_TOKENS + 399_000
    )


def test_lone_surrogates_do_not_break_the_bound():
    body = _chat({"role": "user", "content": "a\ud800b"})
    assert chat_input_bound(body) == REQUEST_TOKENS + MESSAGE_TOKENS + 5


# -- output caps ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "cap"),
    [
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 200}, 200),
        ({"max_completion_tokens": 200, "max_tokens": 300}, 300),
        ({"max_tokens": 100, "n": 3}, 300),
        ({"max_output_tokens": 50}, 50),
        ({"max_tokens": 0}, 0),
        ({"max_tokens": None}, 16_384),
        ({}, 16_384),
        ({"n": 2}, 32_768),
    ],
)
def test_output_cap_from_the_request(body, cap):
    assert output_cap("openai", "gpt-4o", body) == cap


@pytest.mark.parametrize(
    ("model", "cap"),
    [
        ("gpt-4o", 16_384),
        ("gpt-4o-2024-08-06", 16_384),
        ("gpt-4o-mini", 16_384),
        ("chatgpt-4o-latest", 16_384),
        ("gpt-4.1", 32_768),
        ("gpt-4.1-mini", 32_768),
        ("gpt-4-turbo", 4_096),
        ("gpt-4-32k", 32_768),
        ("gpt-4", 8_192),
        ("gpt-3.5-turbo", 4_096),
        ("o1", 100_000),
        ("o1-mini", 65_536),
        ("o3-mini", 100_000),
        ("o4-mini", 100_000),
        ("gpt-5", 128_000),
        ("gpt-5.1-codex", 128_000),
        ("openai/gpt-4.1", 32_768),
        ("ft:gpt-4o:org::abc", 16_384),
        ("claude-sonnet-4-5", 8_192),
        ("some-new-model", 16_384),
    ],
)
def test_default_output_caps(model, cap):
    assert default_output_cap(model) == cap
    assert output_cap("openai", model, {}) == cap


@pytest.mark.parametrize(
    ("body", "what"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": "100"}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_completion_tokens": -5}, "max_completion_tokens"),
        ({"max_output_tokens": 10.0}, "max_output_tokens"),
        ({"max_tokens": 10, "n": 0}, "n"),
        ({"max_tokens": 10, "n": "2"}, "n"),
        ({"max_tokens": 10, "n": False}, "n"),
    ],
)
def test_bad_caps_raise_configuration_error(body, what):
    with pytest.raises(ConfigurationError) as info:
        output_cap("openai", "gpt-4o", body)
    assert info.value.what == what
    assert what in str(info.value)


# -- estimate ------------------------------------------------------------------


def test_estimate_combines_bound_and_cap():
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 7,
    }
    assert estimate("openai", "chat", "gpt-4o", body) == Estimate(
        "openai", "gpt-4o", chat_input_bound(body), 7, exact_input=False
    )
    responses = {"input": "hi"}
    assert estimate("openai", "responses", "o3", responses) == Estimate(
        "openai", "o3", responses_input_bound(responses), 100_000
    )
    anthropic = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9}
    result = estimate("anthropic", "messages", "claude-sonnet-4-5", anthropic)
    assert result.input_tokens == messages_input_bound(anthropic)
    assert result.output_tokens == 9


def test_estimate_rejects_unknown_api():
    with pytest.raises(ConfigurationError) as info:
        estimate("openai", "completions", "gpt-4o", {})
    assert info.value.what == "api"


# -- exact counting only where it changes the decision --------------------------


def test_exact_count_admits_a_call_the_bound_would_refuse(fake_encoding, fake_provider):
    import openai

    import allowance
    from allowance._sdk.openai import CODEC

    text = "the quick test of the things " * 40
    body = {
        "model": "test-model-1",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": text}],
    }
    bound = CODEC.estimate("/chat/completions", body)
    exact = CODEC.refine("/chat/completions", body, bound)
    assert exact is not None
    assert exact.exact_input
    assert exact.total_tokens < bound.total_tokens
    client = allowance.wrap(
        openai.OpenAI(
            base_url=fake_provider.openai_base_url, api_key="t", max_retries=0
        ),
        budget=(exact.total_tokens + bound.total_tokens) // 2,
        ledger="memory://",
    )
    client.chat.completions.create(**body)
    assert fake_provider.generation_count == 1
    (record,) = client.allowance.guard.ledger.calls()
    assert record.estimate_tokens == exact.total_tokens
    client.close()


def test_without_a_cached_encoding_the_bound_decides(no_download, fake_provider):
    import openai

    import allowance

    client = allowance.wrap(
        openai.OpenAI(
            base_url=fake_provider.openai_base_url, api_key="t", max_retries=0
        ),
        budget=50,
        ledger="memory://",
    )
    with pytest.raises(allowance.BudgetExceeded):
        client.chat.completions.create(
            model="gpt-4o",
            max_tokens=10,
            messages=[{"role": "user", "content": "x" * 400}],
        )
    assert no_download == []
    assert fake_provider.generation_count == 0
    client.close()


def test_the_guard_refines_only_a_refused_call():
    from allowance import Estimate, Guard, Usage

    calls: list[int] = []

    def refine() -> Estimate:
        calls.append(1)
        return Estimate("openai", "gpt-4o", 10, 10, exact_input=True)

    guard = Guard(budget=100, ledger="memory://")
    guard.begin(Estimate("openai", "gpt-4o", 40, 10), refine=refine).commit(
        Usage(40, 10)
    )
    assert calls == []  # admitted on the bound: no counting
    ticket = guard.begin(Estimate("openai", "gpt-4o", 80, 10), refine=refine)
    assert calls == [1]
    assert ticket.estimate.exact_input
    assert guard.status()[0].reserved == 20


# -- the commonest body, measured by one small function ---------------------------

_VALUES = st.one_of(
    TEXTS,
    st.none(),
    st.integers(-2, 5),
    st.booleans(),
    st.lists(TEXTS, max_size=2),
    st.dictionaries(st.sampled_from(["type", "text"]), TEXTS, max_size=2),
)
_MESSAGES = st.lists(
    st.one_of(
        st.dictionaries(
            st.sampled_from(["role", "content", "name", "type", "cache_control"]),
            _VALUES,
            max_size=4,
        ),
        st.fixed_dictionaries({"role": st.just("user"), "content": TEXTS}),
        TEXTS,
    ),
    max_size=4,
)
_PLAIN_MESSAGE = st.dictionaries(
    st.sampled_from(["role", "content", "name", "cache_control"]),
    st.one_of(TEXTS, st.none()),
    max_size=3,
)
_PLAIN_BODIES = st.fixed_dictionaries(
    {"model": st.sampled_from(["gpt-4o", "claude-sonnet-4-5", ""])},
    optional={
        "messages": st.lists(_PLAIN_MESSAGE, max_size=4),
        "max_tokens": st.one_of(st.none(), st.integers(0, 10_000)),
        "max_completion_tokens": st.one_of(st.none(), st.integers(0, 10_000)),
        "n": st.one_of(st.none(), st.integers(1, 3)),
        "system": TEXTS,
        "temperature": st.floats(0, 2),
        "metadata": st.builds(object),
    },
)
_BODIES = st.one_of(_PLAIN_BODIES, st.dictionaries(
    st.sampled_from(
        [
            "messages", "model", "max_tokens", "max_completion_tokens",
            "max_output_tokens", "n", "temperature", "system", "tools", "stream",
            "prediction",
        ]
    ),
    st.one_of(_MESSAGES, _VALUES, st.just("gpt-4o"), st.builds(object)),
    max_size=6,
))  # fmt: skip


def _full(api: str, body: dict[str, object]) -> tuple[int, int] | None:
    """What the full walk says of ``body``: (input bound, output cap), or None."""
    try:
        bound = chat_input_bound(body) if api == "chat" else messages_input_bound(body)
        return bound, output_cap("openai", str(body.get("model") or ""), body)
    except ConfigurationError:
        return None


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(body=_BODIES, api=st.sampled_from(["chat", "messages"]))
def test_plain_bound_equals_the_full_walk_where_it_answers(
    body: dict[str, object], api: str
) -> None:
    plain = _estimate.plain_bound(body, None if api == "chat" else MESSAGE_TOKENS)
    if plain is None:
        return  # the full walk measures it
    bound, cap = plain
    model = str(body.get("model") or "")
    assert _full(api, body) == (
        bound,
        default_output_cap(model) if cap is None else cap,
    )


@pytest.mark.parametrize(
    ("api", "body"),
    [
        ("chat", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hé"}]}),
        (
            "chat",
            {
                "model": "gpt-4o",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Say hi", "name": "ann"},
                ],
                "max_tokens": 16,
                "max_completion_tokens": 20,
                "temperature": 0.2,
                "stream": False,
            },
        ),
        (
            "messages",
            {
                "model": "claude-sonnet-4-5",
                "system": "Be brief.",
                "messages": [{"role": "user", "content": "Say hi"}],
                "max_tokens": 100,
                "metadata": object(),  # an SDK placeholder: never sent
            },
        ),
    ],
)
def test_plain_bound_answers_for_the_commonest_bodies(
    api: str, body: dict[str, object]
) -> None:
    plain = _estimate.plain_bound(body, None if api == "chat" else MESSAGE_TOKENS)
    assert plain is not None
    model = str(body["model"])
    assert _full(api, body) == (
        plain[0],
        default_output_cap(model) if plain[1] is None else plain[1],
    )


COUNTS = st.integers(min_value=0, max_value=10**9)


@given(
    counts=st.tuples(COUNTS, COUNTS, COUNTS, COUNTS, COUNTS),
    cost=st.none() | COUNTS,
    micros=st.none() | COUNTS,
    latency=st.floats(min_value=0, max_value=1e6),
    outcome=st.sampled_from(["ok", "degraded"]),
)
def test_the_fast_builders_build_what_the_constructors_build(
    counts: tuple[int, int, int, int, int],
    cost: int | None,
    micros: int | None,
    latency: float,
    outcome: Literal["ok", "degraded"],
) -> None:
    """``make_usage``, ``make_estimate`` and ``make_record`` (slot stores, the
    express lane's) equal the dataclasses' own constructors, field for field."""
    usage = _estimate.make_usage(*counts)
    assert usage == Usage(*counts)
    assert type(usage) is Usage
    made = _estimate.make_estimate("openai", "gpt-4o-mini", counts[0], counts[1])
    assert made == Estimate("openai", "gpt-4o-mini", counts[0], counts[1])
    assert made.exact_input is False
    fields = (
        "call-1",
        1.5,
        MappingProxyType({"tenant": "acme"}),
        "openai",
        "gpt-4o-mini-2024-07-18",
        "gpt-4o",
        usage,
        cost,
        ("openai",),
        outcome,
        counts[2],
        micros,
        latency,
    )
    record = _estimate.make_record(*fields)
    expected = CallRecord(*fields)
    assert type(record) is CallRecord
    assert record == expected
    assert [getattr(record, f.name) for f in dataclasses.fields(CallRecord)] == list(
        fields
    )
    assert repr(record) == repr(expected)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.cost_micros = 0  # type: ignore[misc]  # frozen, as the constructor's


def test_the_hot_path_builds_its_records_without_their_constructors() -> None:
    """Each per-call dataclass has its draft: built by plain stores, then frozen.

    If this fails: a field, a slot or a ``__post_init__`` changed the class's
    shape, and the hot path silently fell back to the constructor (Estimate's
    check cost the SQLite path ~70 bytecodes a call that way).
    """
    from allowance import _estimate as module
    from allowance._estimate import make_estimate, make_usage

    assert module._ESTIMATE_DRAFT is not None
    assert module._USAGE_DRAFT is not None
    assert module._RECORD_DRAFT is not None
    built = make_estimate("openai", "gpt-4o", 12, 34)
    assert type(built) is Estimate
    assert built == Estimate("openai", "gpt-4o", 12, 34)
    assert make_usage(5, 6) == Usage(5, 6)


def test_a_named_one_character_message_is_not_undercounted():
    """OpenAI bills 3 + role + name + 1 + content: 7 for name "a", content "a".

    The byte bound counted 6 (4 + 1 + 1): a named message's own token was
    missing, on the exact path too.
    """
    body = _chat({"role": "user", "name": "a", "content": "a"})
    assert chat_input_bound(body) == REQUEST_TOKENS + 7


def test_tools_count_their_bytes_and_builtin_tools_their_overhead():
    """A typed tool of the provider's own adds far more than its definition."""
    from allowance._estimate import (
        ANTHROPIC_TOOLS_TOKENS,
        BUILTIN_TOOL_TOKENS,
        TOOL_TOKENS,
        messages_input_bound,
    )

    tools = [
        {"type": "bash_20250124", "name": "bash"},
        {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
    ]
    body = {"model": "claude-haiku-4-5", "max_tokens": 10, "tools": tools,
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    without = messages_input_bound({**body, "tools": []})
    definitions = sum(len(json.dumps(t)) for t in tools)
    assert messages_input_bound(body) == (
        without + ANTHROPIC_TOOLS_TOKENS + 2 * (TOOL_TOKENS + BUILTIN_TOOL_TOKENS)
        + definitions
    )  # fmt: skip
    assert messages_input_bound(body) - without >= 346 + 245 + 700  # as billed
