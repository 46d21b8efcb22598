"""The official data format and prompt construction, and one-line errors for hostile data files."""
from __future__ import annotations

import json

import pytest

from .conftest import ROWS, finetune_args, write_jsonl


@pytest.fixture(scope="module")
def sp(tiny_model_dir):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from glmsetup.runtime.tokenizer import ChatGLM2Tokenizer

    return ChatGLM2Tokenizer(tiny_model_dir / "tokenizer.model")


def test_rows_are_built_as_preprocess_function_train_builds_them(tmp_path, tokenizer, sp):
    from glmsetup.finetune import data

    path = write_jsonl(tmp_path / "chat.json", [
        {"prompt": "你好" * 40, "response": "很高兴见到你" * 30, "history": [["第一问", "第一答"]]},
        {"prompt": "", "response": "skipped: empty prompt", "history": []},
        {"prompt": "晚上睡不着", "response": "放松身心", "history": []},
    ])
    ds = data.load(path, tokenizer, data.Columns("prompt", "response", "history"), max_source_length=20,
                   max_target_length=8)
    assert len(ds) == 2 and ds.skipped == 1
    gmask, sop = sp.vocab_size() + 1, sp.vocab_size() + 3  # [MASK], [gMASK], [sMASK], sop, eop follow the pieces
    prompt = "[Round 1]\n\n问：第一问\n\n答：第一答\n\n[Round 2]\n\n问：" + "你好" * 40 + "\n\n答："
    a_ids = [gmask, sop] + sp.encode(prompt)[:18]  # truncation keeps the two special tokens
    b_ids = sp.encode("很高兴见到你" * 30)[:8]
    ids, labels = data.official_row(ds.sources[0], ds.targets[0], 2, 0, 20, 8)
    assert ids == a_ids + b_ids + [2] + [0] * (29 - 29)
    assert labels == [-100] * 20 + b_ids + [2]
    short = [gmask, sop] + sp.encode("[Round 1]\n\n问：晚上睡不着\n\n答：")
    ids, labels = data.official_row(ds.sources[1], ds.targets[1], 2, 0, 20, 8)
    answer = sp.encode("放松身心")
    assert len(ids) == len(labels) == 29  # max_source_length + max_target_length + 1, padded with the pad id
    assert ids == short + answer + [2] + [0] * (29 - len(short) - len(answer) - 1)
    assert labels == [-100] * len(short) + answer + [2] + [-100] * (29 - len(short) - len(answer) - 1)
    # without ignore_pad_token_for_loss the pad id stays a label, as in the official code
    _, kept = data.official_row(ds.sources[1], ds.targets[1], 2, 0, 20, 8, ignore_pad_token_for_loss=False)
    assert kept[0] == 0 and -100 not in kept
    # a batch drops only the padding columns every row shares
    ids, labels = data.batch(ds, [1], 2, 0, 20, 8)
    assert ids.shape == (1, len(short) + len(answer) + 1) and labels[0, -1] == 2


def test_a_json_array_and_a_bom_are_read(tmp_path, tokenizer):
    from glmsetup.finetune import data

    path = tmp_path / "array.json"
    path.write_text("\ufeff" + json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    assert len(data.load(path, tokenizer, data.Columns("content", "summary"))) == len(ROWS)
    lines = write_jsonl(tmp_path / "bom.json", ROWS)
    lines.write_bytes(b"\xef\xbb\xbf" + lines.read_bytes())
    assert len(data.load(lines, tokenizer, data.Columns("content", "summary"))) == len(ROWS)


BAD = [
    ("malformed", ['{"content": "a", "summary": "b"}', '{"content": "a", "summary": "b"}', '{"content": "a", "summ'],
     "line 3: not valid JSON"),
    ("missing column", ['{"content": "a", "summary": "b"}', '{"content": "a", "answer": "b"}'],
     "line 2: no 'summary' field"),
    ("not a string", ['{"content": "a", "summary": "b"}', '', '{"content": 42, "summary": "b"}'],
     "line 3: 'content' is a number, not text"),
    ("null", ['{"content": null, "summary": "b"}'], "line 1: 'content' is null, not text"),
    ("not an object", ['{"content": "a", "summary": "b"}', '"just text"'], "line 2: a string, not a JSON object"),
    ("bad history", ['{"content": "a", "summary": "b", "history": [["q"]]}'], "line 1: 'history' round 1"),
]


@pytest.mark.parametrize("name, lines, message", BAD, ids=[b[0] for b in BAD])
def test_hostile_lines_are_one_line_errors_with_the_line_number(cli, tiny_model_dir, tmp_path, name, lines, message):
    path = tmp_path / "bad.json"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    extra = ["--history-column", "history"] if name == "bad history" else []
    result = cli(*finetune_args(tiny_model_dir, path, out, "ptuning", "--steps", "1", *extra))
    assert result.exit_code == 2, result.stdout + result.stderr
    err = result.stderr
    assert message in err and str(path) in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1 and "hint:" in err
    assert not out.exists()  # nothing written: the data is read before the output folder is touched


def test_huge_line_not_utf8_and_too_many_examples(cli, tiny_model_dir, tmp_path, monkeypatch):
    from glmsetup.finetune import data

    huge = tmp_path / "huge.json"
    huge.write_bytes(b'{"content": "a", "summary": "b"}\n' + b'{"content": "' + b"x" * (data.MAX_LINE_BYTES + 10) + b'"}\n')
    doc = cli.json(*finetune_args(tiny_model_dir, huge, tmp_path / "o1", "ptuning", "--steps", "1"), exit_code=2)
    assert "line 2: the line is longer than 1 MiB" in doc["error"]["message"]
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"content": "caf\xe9", "summary": "b"}\n'.encode("latin-1"))
    doc = cli.json(*finetune_args(tiny_model_dir, latin, tmp_path / "o2", "ptuning", "--steps", "1"), exit_code=2)
    assert "line 1: not UTF-8" in doc["error"]["message"]
    monkeypatch.setattr(data, "MAX_EXAMPLES", 3)
    many = write_jsonl(tmp_path / "many.json", ROWS * 2)
    doc = cli.json(*finetune_args(tiny_model_dir, many, tmp_path / "o3", "ptuning", "--steps", "1"), exit_code=2)
    assert "line 4: more than 3 examples" in doc["error"]["message"] and "--max-samples" in doc["error"]["hint"]
    empty = write_jsonl(tmp_path / "empty.json", [{"content": "", "summary": "x"}])
    doc = cli.json(*finetune_args(tiny_model_dir, empty, tmp_path / "o4", "ptuning", "--steps", "1"), exit_code=2)
    assert "no usable example" in doc["error"]["message"]
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_output_folder_and_option_refusals(cli, tiny_model_dir, train_file, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    doc = cli.json(*finetune_args(tiny_model_dir, train_file, foreign, "ptuning", "--steps", "1"), exit_code=2)
    assert "not empty" in doc["error"]["message"] and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    doc = cli.json(*finetune_args(tiny_model_dir, train_file, tmp_path / "o", "ptuning", "--steps", "1",
                                  "--epochs", "1"), exit_code=2)
    assert "--steps and --epochs" in doc["error"]["message"]
    doc = cli.json(*finetune_args(tmp_path / "nothing", train_file, tmp_path / "o", "ptuning", "--steps", "1"),
                   exit_code=4)
    assert "no model folder" in doc["error"]["message"]
    doc = cli.json(*finetune_args(tiny_model_dir, tmp_path / "absent.json", tmp_path / "o", "ptuning"), exit_code=2)
    assert "no data file" in doc["error"]["message"]
    assert not (tmp_path / "o").exists()
