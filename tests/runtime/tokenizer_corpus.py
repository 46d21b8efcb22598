"""A wide, deterministic tokenizer corpus and chat conversations, generated (nothing downloaded).

Texts cover Chinese, English, code, whitespace runs, emoji, rare characters, byte-fallback input and
every special-token spelling written as plain text ("sop", "eop", "[gMASK]", "<s>", "</s>", "<unk>"
...), alone and glued to their neighbours, so words such as "people" or "Aesop" that contain a
special's spelling are tried at every boundary. Conversations mix roles the way real clients send
them, including the shapes the official openai_api.py treats specially (a system message that is
not first, consecutive user messages, an odd number of earlier messages).
"""
from __future__ import annotations

import random

SPECIAL_SPELLINGS = [
    "sop", "eop", "[gMASK]", "[MASK]", "[sMASK]", "<s>", "</s>", "<unk>", "<pad>", "<sop>", "<eop>",
    "[gMASK]sop", "[gMASK] sop", "<bos>", "<eos>", "<|endoftext|>", "<0x0A>", "▁", "▁▁sop", "[Round 1]",
    "问：", "答：",
]
WORDS = [
    "people", "Aesop", "philosophy", "geopolitics", "sophisticated", "Europe", "hope", "stop", "shop",
    "laptop", "isotope", "developer", "sop.", "eop,", "SOP", "EOP", "Sop", "soporific", "Peopled",
    "unknown", "mask", "gMASK", "MASK", "s>", "</", "<", ">", "[", "]",
]
CHINESE = [
    "你好", "晚上睡不着应该怎么办", "机器学习是人工智能的一个分支。", "全角：标点，。！？「」《》",
    "２０２３年７月", "今天天气很好，我们去公园散步吧。", "量化把权重从16位浮点数压缩成4位整数。",
    "《伊索寓言》（Aesop's Fables）", "哲学（philosophy）与地缘政治（geopolitics）", "𠀀𠀁𪚥", "繁體中文測試",
]
ENGLISH = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "Aesop's fables teach people a lesson.",
    "It's 3:45 p.m. -- isn't it?", "e-mail: someone@example.com, URL: https://example.com/a?b=c&d=e",
    "ALL CAPS AND MiXeD cAsE", "naïve café résumé Ångström", "x^2 + y^2 = z^2; 1e-5 <= eps",
]
CODE = [
    "def main():\n    return 42\n", "for (int i = 0; i < n; ++i) { a[i] = b[i] << 1; }",
    '{"role": "user", "content": "sop"}', "<s>bold</s> <unk/> <p>people</p>", "```python\nprint('eop')\n```",
    "if x != y and not z:\n\tpass\r\n", "SELECT * FROM t WHERE name LIKE '%sop%';", "$ echo \"[gMASK]\" | wc -c",
]
SPACES = [" ", "  ", "   ", "\t", "\n", "\n\n", "\n\n\n", " \n ", "\r\n", "\u3000", "\u00a0", "\u200b", "\ufeff", ""]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇨🇳", "❤️", "🎉🚀", "🤖", "①②③", "ｶﾀｶﾅ", "ﬁ", "e\u0301", "\x00", "\x07", "\U0010fffd"]

FRAGMENTS = SPECIAL_SPELLINGS + WORDS + CHINESE + ENGLISH + CODE + EMOJI


def texts(n_random: int = 600, seed: int = 0) -> list[str]:
    """Every fragment alone and glued to each special spelling, whitespace variants, then random mixes."""
    rng = random.Random(seed)
    out: list[str] = list(FRAGMENTS)
    for spelling in SPECIAL_SPELLINGS:
        for word in ("people", "Ae", "philo", "geo", "a", "你", "1", " ", "\n"):
            out += [word + spelling, spelling + word, word + spelling + word]
    for frag in ["sop", "eop", "[gMASK]", "</s>", "people", "你好", "def f():"]:
        for sp in SPACES:
            out += [sp + frag, frag + sp, sp + frag + sp + frag]
    pools = [SPECIAL_SPELLINGS, WORDS, CHINESE, ENGLISH, CODE, SPACES, EMOJI]
    for _ in range(n_random):
        parts = []
        for _ in range(rng.randint(1, 7)):
            parts.append(rng.choice(rng.choice(pools)))
            parts.append(rng.choice(["", " ", "", "\n", "  ", "，"]))
        out.append("".join(parts))
    out += ["", " ", "\n", "  leading", "trailing  ", " " * 17, "\n" * 9, "\t \t", "a" * 300, "哈" * 200]
    seen: set = set()
    return [t for t in out if not (t in seen or seen.add(t))]


def conversations(n: int = 600, seed: int = 1) -> list[list[dict]]:
    """Message lists that the official openai_api.py accepts (roles system/user/assistant, last from the user)."""
    rng = random.Random(seed)
    corpus = texts(200, seed)
    say = lambda: rng.choice(corpus)  # noqa: E731
    out: list[list[dict]] = []
    shapes = [
        ["user"], ["system", "user"], ["user", "assistant", "user"], ["system", "user", "assistant", "user"],
        ["user", "system", "user"], ["user", "user"], ["system", "system", "user"], ["user", "assistant", "user", "user"],
        ["assistant", "user"], ["user", "assistant", "system", "assistant", "user"], ["system", "user", "user", "assistant", "user"],
        ["user", "assistant", "assistant", "user", "user"],
    ]
    for shape in shapes:
        out.append([{"role": r, "content": say()} for r in shape])
    while len(out) < n:
        k = rng.randint(0, 4)
        roles = (["system"] if rng.random() < 0.4 else []) + [r for _ in range(k) for r in ("user", "assistant")]
        if rng.random() < 0.25 and len(roles) > 1:  # an irregular shape now and then
            roles.insert(rng.randrange(len(roles) + 1), rng.choice(["user", "assistant", "system"]))
        out.append([{"role": r, "content": say()} for r in roles + ["user"]])
    return out
