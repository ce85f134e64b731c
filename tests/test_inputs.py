"""Issue 35 ("Runs and inputs"): untrusted prompt files, model and LoRA paths, run directories and launches are each
one line naming the problem (exit 2), or accepted when they are valid."""

import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc

import pytest

from diffalign.prompts import PromptError, read_prompt_records


# ------------------------------------------------------------------------------------------------- prompt files
def test_a_directory_as_prompt_file_is_named_a_directory(tmp_path):
    with pytest.raises(PromptError, match="is a directory"):
        read_prompt_records(str(tmp_path))


def test_a_device_as_prompt_file_is_named_a_device():
    with pytest.raises(PromptError, match="not a regular file"):
        read_prompt_records("/dev/zero")


def test_deeply_nested_jsonl_is_one_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"prompt": "a cat", "x": ' + "[" * 100000 + "]" * 100000 + "}\n")
    with pytest.raises(PromptError, match="line 1 is nested too deeply"):
        read_prompt_records(str(path))


def test_jsonl_line_holding_a_raw_line_separator_is_accepted(tmp_path):
    path = tmp_path / "p.jsonl"
    # json.dumps(ensure_ascii=False) writes U+2028 raw: valid JSON, one line of JSON Lines
    path.write_text(json.dumps({"prompt": "a cat\u2028on a mat", "tag": "x"}, ensure_ascii=False) + "\n"
                    + json.dumps({"prompt": "a dog"}) + "\n", encoding="utf-8")
    prompts, metadata = read_prompt_records(str(path))
    assert prompts == ["a cat\u2028on a mat", "a dog"] and metadata == [{"tag": "x"}, {}]


def test_text_prompt_file_splits_on_newlines_only(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("a cat\u2028on a mat\r\na dog\x0cand a bird\n# a comment\n\na fish".encode())
    assert read_prompt_records(str(path))[0] == ["a cat\u2028on a mat", "a dog\x0cand a bird", "a fish"]


def test_csv_prompt_file_keeps_quoted_line_breaks(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b'prompt,tag\r\n"a cat\non a mat",x\r\na dog,y\r\n')
    prompts, metadata = read_prompt_records(str(path))
    assert prompts == ["a cat\non a mat", "a dog"] and metadata == [{"tag": "x"}, {"tag": "y"}]


def test_large_jsonl_is_read_a_line_at_a_time(tmp_path):
    path = tmp_path / "big.jsonl"
    padding = " " * 20000  # whitespace after each object: 8 MB of file, 400 short prompts
    with open(path, "w") as f:
        for i in range(400):
            f.write(json.dumps({"prompt": f"prompt {i}"}) + padding + "\n")
    tracemalloc.start()
    try:
        prompts, _ = read_prompt_records(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(prompts) == 400
    assert peak < 2_000_000, f"peak {peak} bytes for a {os.path.getsize(path)}-byte file"  # not read whole
