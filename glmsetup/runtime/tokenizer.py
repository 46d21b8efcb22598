"""The ChatGLM2 tokenizer on plain sentencepiece: the official ids, prompts and decoding, no remote code.

tokenizer.model holds n sentencepiece pieces; five special ids follow them: [MASK]=n, [gMASK]=n+1,
[sMASK]=n+2, sop=n+3, eop=n+4. unk = pad = 0, bos = 1 (unused), eos = 2. A prompt is
[gMASK, sop] + the pieces of the text. The special tokens are never matched inside text: a user
who types "[gMASK]" or "sop" gets those characters tokenized as plain text. As in the official
tokenizer, a sentencepiece piece spelled exactly like a special token (the real tokenizer.model has
none) gets the special's id.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
TOKENIZER_FILE = "tokenizer.model"


def prompt_round(index: int, query: str, response: Optional[str] = None) -> str:
    """One round of the official chat prompt (rounds count from 1, full-width colons)."""
    text = f"[Round {index}]\n\n问：{query}\n\n答："
    return text if response is None else f"{text}{response}\n\n"


def build_prompt(query: str, history: Optional[Sequence] = None) -> str:
    history = list(history or [])
    parts = [prompt_round(i + 1, q, r) for i, (q, r) in enumerate(history)]
    parts.append(prompt_round(len(history) + 1, query))
    return "".join(parts)


class ChatGLM2Tokenizer:
    """Behaves like the official ChatGLMTokenizer where demos and apps touch it."""

    padding_side = "left"
    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    vocab_files_names = {"vocab_file": TOKENIZER_FILE}

    def __init__(self, vocab_file: Union[str, Path]):
        import sentencepiece as spm

        self.vocab_file = str(vocab_file)
        self.sp = spm.SentencePieceProcessor(model_file=self.vocab_file)
        self.n_words = self.sp.vocab_size()
        self.special_tokens = {tok: self.n_words + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.index_special_tokens = {v: k for k, v in self.special_tokens.items()}
        # The official tokenizer maps pieces to ids by name, so a piece named like a special gets its id.
        self._special_pieces = {pid: self.special_tokens[name] for name in SPECIAL_TOKENS
                                if (pid := self.sp.piece_to_id(name)) != self.sp.unk_id()}
        self.unk_token_id = self.pad_token_id = 0
        self.bos_token_id, self.eos_token_id = 1, 2
        self.unk_token, self.pad_token, self.eos_token = "<unk>", "<unk>", "</s>"
        self.name_or_path = str(Path(vocab_file).parent)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], **_ignored) -> "ChatGLM2Tokenizer":
        return cls(Path(path) / TOKENIZER_FILE)

    # -- vocabulary ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.n_words + len(SPECIAL_TOKENS)

    def __len__(self) -> int:
        return self.vocab_size

    def get_command(self, token: str) -> int:
        return self.special_tokens[token]

    def get_prefix_tokens(self) -> list[int]:
        return [self.special_tokens["[gMASK]"], self.special_tokens["sop"]]

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp.id_to_piece(i): i for i in range(self.n_words)}
        vocab.update(self.special_tokens)
        return vocab

    def tokenize(self, text: str, **_ignored) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.special_tokens.get(tokens, self.sp.piece_to_id(tokens))
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            if ids in self.index_special_tokens:
                return self.index_special_tokens[ids]
            return self.sp.id_to_piece(ids) if 0 <= ids < self.n_words else ""
        return [self.convert_ids_to_tokens(int(i)) for i in ids]

    # -- encoding -----------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True, **_ignored) -> list[int]:
        ids = self.sp.encode(text)
        if self._special_pieces:
            ids = [self._special_pieces.get(i, i) for i in ids]
        return self.get_prefix_tokens() + ids if add_special_tokens else ids

    def build_prompt(self, query: str, history: Optional[Sequence] = None) -> str:
        return build_prompt(query, history)

    def __call__(self, text, return_tensors: Optional[str] = None, padding=True, add_special_tokens: bool = True,
                 max_length: Optional[int] = None, truncation: bool = False, **_ignored):
        """`tokenizer(text)` or `tokenizer([texts])`: input_ids, attention_mask, position_ids, left-padded."""
        single = isinstance(text, str)
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in ([text] if single else text)]
        return self.pad_ids(rows, return_tensors=return_tensors, single=single and return_tensors is None,
                            max_length=max_length if truncation else None)

    def batch_encode_plus(self, texts, return_tensors=None, add_special_tokens=True, **kw):
        rows = []
        for item in texts:
            item = item[0] if isinstance(item, tuple) else item
            rows.append(list(item) if not isinstance(item, str) else self.encode(item, add_special_tokens))
        return self.pad_ids(rows, return_tensors=return_tensors)

    def pad_ids(self, rows: list[list[int]], return_tensors: Optional[str] = None, single: bool = False,
                max_length: Optional[int] = None):
        """Left padding with pad id 0; position ids count 0.. from each row's first real token."""
        from transformers import BatchEncoding

        if max_length:
            rows = [r[-max_length:] for r in rows]
        width = max((len(r) for r in rows), default=0)
        data = {"input_ids": [], "attention_mask": [], "position_ids": []}
        for r in rows:
            pad = width - len(r)
            data["input_ids"].append([self.pad_token_id] * pad + list(r))
            data["attention_mask"].append([0] * pad + [1] * len(r))
            data["position_ids"].append([0] * pad + list(range(len(r))))
        if single:
            data = {k: v[0] for k, v in data.items()}
        return BatchEncoding(data, tensor_type=return_tensors)

    # -- decoding -----------------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = True, **_ignored) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            if len(ids) != 1:
                raise ValueError("decode takes one sequence; use batch_decode for several")
            ids = ids[0]
        keep = [i for i in ids if 2 < i < self.n_words]
        return self.sp.decode(keep)

    def batch_decode(self, sequences: Iterable, **kw) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, **kw) for s in sequences]

    # -- saving -------------------------------------------------------------------------------------
    def save_pretrained(self, dest: Union[str, Path]) -> list[str]:
        """Write tokenizer.model and a tokenizer_config.json (no auto_map: nothing to execute)."""
        import os
        import shutil

        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        tmp = dest / (TOKENIZER_FILE + ".tmp")
        shutil.copyfile(self.vocab_file, tmp)
        os.replace(tmp, dest / TOKENIZER_FILE)
        return [str(dest / TOKENIZER_FILE)]

    def __repr__(self) -> str:
        return f"ChatGLM2Tokenizer(vocab_size={self.vocab_size}, file={self.vocab_file!r})"
