"""Training data: the official JSON-lines format and the official prompt construction.

A file holds one JSON object per line (AdvertiseGen: {"content": ..., "summary": ...}); a file that
is one JSON array of such objects is read too. --prompt-column and --response-column name the two
text fields; --history-column names a list of [query, response] pairs of earlier rounds.

Each example becomes what ptuning/main.py's preprocess_function_train makes of it:
prompt = build_prompt(query, history) ("[Round n]\\n\\n问：...\\n\\n答："), a_ids = [gMASK, sop] + its
pieces cut to max_source_length, b_ids = the response's pieces cut to max_target_length,
input_ids = a_ids + b_ids + [eos], labels = [pad] * len(a_ids) + b_ids + [eos], both padded with the
pad id to max_source_length + max_target_length + 1; with ignore_pad_token_for_loss (the default)
every pad id among the labels becomes -100. Examples whose prompt or response is empty are skipped,
as there. Anything else that is off (a line that is not JSON, a missing column, a number where text
belongs, an over-long line, too many examples) is a UsageError naming the file and the line.
"""
from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from glmsetup.errors import UsageError
from glmsetup.runtime.tokenizer import build_prompt

MAX_LINE_BYTES = 1 << 20  # one example; AdvertiseGen's longest is under 1 KB
MAX_ARRAY_BYTES = 256 << 20  # a file that is a single JSON array is parsed whole
MAX_EXAMPLES = 1_000_000
IGNORE = -100


@dataclass(frozen=True)
class Columns:
    prompt: str
    response: str
    history: Optional[str] = None


@dataclass
class Dataset:
    """Tokenized examples: the source ids (with [gMASK, sop]) and the target ids, kept compact."""

    path: Path
    sources: list = field(default_factory=list)  # array('i') each
    targets: list = field(default_factory=list)
    skipped: int = 0
    sha256: str = ""
    lines: int = 0

    def __len__(self) -> int:
        return len(self.sources)


def _bad(path: Path, line: int, what: str, hint: str) -> UsageError:
    return UsageError(f"{path}, line {line}: {what}", hint=hint)


def _type_name(value) -> str:
    return {dict: "an object", list: "a list", bool: "true/false", type(None): "null", int: "a number",
            float: "a number", str: "a string"}.get(type(value), type(value).__name__)


def _records(path: Path, digest) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line, or each element of a top-level array."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}", hint="check the path given to --data/--eval")
    with fh:
        head = fh.read(4096)
        first = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
        fh.seek(0)
        if first == b"[":
            yield from _array_records(path, fh, digest)
            return
        number = 0
        while True:
            raw = fh.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            number += 1
            digest.update(raw)
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise _bad(path, number, f"the line is longer than {MAX_LINE_BYTES >> 20} MiB",
                           "one JSON object per line; is this a JSON-lines file?")
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise _bad(path, number, "not UTF-8 text", "save the file as UTF-8") from None
            try:
                yield number, json.loads(text)
            except ValueError as exc:
                raise _bad(path, number, f"not valid JSON ({exc.msg} at column {exc.colno})",
                           'each line must be one JSON object, e.g. {"content": "...", "summary": "..."}') from None


def _array_records(path: Path, fh, digest) -> Iterator[tuple[int, object]]:
    data = fh.read(MAX_ARRAY_BYTES + 1)
    digest.update(data)
    if len(data) > MAX_ARRAY_BYTES:
        raise _bad(path, 1, f"a single JSON array larger than {MAX_ARRAY_BYTES >> 20} MiB",
                   "write one JSON object per line (JSON lines) for large data sets")
    try:
        items = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise _bad(path, 1, "not UTF-8 text", "save the file as UTF-8") from None
    except ValueError as exc:
        raise _bad(path, exc.lineno, f"not valid JSON ({exc.msg} at column {exc.colno})",
                   "check the brackets and commas, or write one JSON object per line") from None
    for i, item in enumerate(items, start=1):  # no line numbers inside an array: the element's index
        yield i, item


def _text(path: Path, line: int, record: dict, column: str) -> str:
    if column not in record:
        keys = ", ".join(sorted(map(str, record))[:6]) or "none"
        raise _bad(path, line, f"no '{column}' field (it has: {keys})",
                   "name the fields with --prompt-column and --response-column")
    value = record[column]
    if not isinstance(value, str):
        raise _bad(path, line, f"'{column}' is {_type_name(value)}, not text", "every prompt and response must be a string")
    return value


def _history(path: Path, line: int, record: dict, column: str) -> list:
    if column not in record:
        raise _bad(path, line, f"no '{column}' field", "every example needs the --history-column field ([] for none)")
    value = record[column]
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad(path, line, f"'{column}' is {_type_name(value)}, not a list of [query, response] pairs",
                   'e.g. "history": [["question 1", "answer 1"]]')
    for n, pair in enumerate(value, start=1):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise _bad(path, line, f"'{column}' round {n} is not a [query, response] pair of strings",
                       'e.g. "history": [["question 1", "answer 1"]]')
    return value


def encode_example(tokenizer, query: str, answer: str, history: Optional[list], max_source_length: int,
                   max_target_length: int) -> tuple[list, list]:
    """(a_ids, b_ids) as preprocess_function_train makes them (truncation keeps [gMASK, sop])."""
    special = tokenizer.get_prefix_tokens()
    prompt_ids = tokenizer.encode(build_prompt(query, history), add_special_tokens=False)
    a_ids = special + prompt_ids[:max(0, max_source_length - len(special))]
    b_ids = tokenizer.encode(answer, add_special_tokens=False)[:max_target_length]
    return a_ids, b_ids


def load(path, tokenizer, columns: Columns, *, max_source_length: int = 64, max_target_length: int = 128,
         max_samples: Optional[int] = None) -> Dataset:
    """Read and tokenize a data file; UsageError with the line number on anything malformed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"no data file at {path}", hint="pass a JSON-lines file (one object per line) to --data")
    digest = hashlib.sha256()
    ds = Dataset(path)
    for line, record in _records(path, digest):
        ds.lines = line
        if not isinstance(record, dict):
            raise _bad(path, line, f"{_type_name(record)}, not a JSON object",
                       'each example is an object, e.g. {"content": "...", "summary": "..."}')
        query = _text(path, line, record, columns.prompt)
        answer = _text(path, line, record, columns.response)
        history = _history(path, line, record, columns.history) if columns.history else None
        if not query or not answer:  # the official code skips these
            ds.skipped += 1
            continue
        if max_samples is not None and len(ds) >= max_samples:
            break
        if len(ds) >= MAX_EXAMPLES:
            raise _bad(path, line, f"more than {MAX_EXAMPLES:,} examples",
                       "train on a part: --max-samples N (or split the file)")
        a_ids, b_ids = encode_example(tokenizer, query, answer, history, max_source_length, max_target_length)
        ds.sources.append(array("i", a_ids))
        ds.targets.append(array("i", b_ids))
    if not len(ds):
        raise UsageError(f"{path} holds no usable example ({ds.skipped} with an empty prompt or response)",
                         hint=f"each line needs non-empty '{columns.prompt}' and '{columns.response}' fields")
    ds.sha256 = digest.hexdigest()
    return ds


def official_row(a_ids, b_ids, eos: int, pad: int, max_source_length: int, max_target_length: int,
                 ignore_pad_token_for_loss: bool = True) -> tuple[list, list]:
    """(input_ids, labels) of one example exactly as the official code pads them."""
    width = max_source_length + max_target_length + 1
    input_ids = list(a_ids) + list(b_ids) + [eos]
    labels = [pad] * len(a_ids) + list(b_ids) + [eos]
    input_ids += [pad] * (width - len(input_ids))
    labels += [pad] * (width - len(labels))
    if ignore_pad_token_for_loss:
        labels = [IGNORE if x == pad else x for x in labels]
    return input_ids, labels


def batch(ds: Dataset, indices, eos: int, pad: int, max_source_length: int, max_target_length: int):
    """input_ids and labels tensors [len(indices), width] for some examples.

    Rows are the official ones; the padding columns every row of the batch shares at the end are
    dropped (with causal attention they change no loss: pad labels are -100 and nothing before a
    pad token looks at it).
    """
    import torch

    rows = [official_row(ds.sources[i], ds.targets[i], eos, pad, max_source_length, max_target_length)
            for i in indices]
    used = max(len(ds.sources[i]) + len(ds.targets[i]) + 1 for i in indices)
    ids = torch.tensor([r[0][:used] for r in rows], dtype=torch.long)
    labels = torch.tensor([r[1][:used] for r in rows], dtype=torch.long)
    return ids, labels
