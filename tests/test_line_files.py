"""Files of one item per line (`embed --texts`, `embed --images LIST.txt`, `explain --texts`):
lines end at \\n (and \\r\\n) only, never at U+2028, U+0085 or a form feed inside a caption; a
byte that is not UTF-8 is refused with its line, exit 2, one line on stderr."""
import json

import pytest
from typer.testing import CliRunner

from eclip.cli import app
from eclip.errors import EclipError

# five lines, three holding characters str.splitlines() would also split at
CAPTIONS = ["Queen Elizabeth II\u2028at Windsor", "Angela Merkel\x85in Berlin", "page one\x0cpage two",
            "Barack Obama", "the flag of Japan"]


def write_captions(path, newline="\n"):
    path.write_bytes(newline.join(CAPTIONS).encode() + newline.encode())
    return path


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_embed_texts_file_keeps_its_lines(tmp_path, newline):
    from eclip.embed import text_inputs
    rows = text_inputs(write_captions(tmp_path / "caps.txt", newline))
    assert [(r["id"], r["text"]) for r in rows] == [(str(i), c) for i, c in enumerate(CAPTIONS, 1)]


def test_embed_texts_jsonl_accepts_a_raw_line_separator_inside_a_string(tmp_path):
    from eclip.embed import text_inputs
    path = tmp_path / "caps.jsonl"
    path.write_text("".join(json.dumps({"text": c}, ensure_ascii=False) + "\n" for c in CAPTIONS), encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")          # raw, as a valid JSON writer may leave it
    assert [r["text"] for r in text_inputs(path)] == CAPTIONS


def test_image_list_keeps_names_with_odd_characters(tmp_path, real_images):
    from eclip.embed import image_inputs
    odd = tmp_path / "Queen\u2028Elizabeth.jpg"
    odd.write_bytes(real_images["astronaut"].read_bytes())
    listing = tmp_path / "list.txt"
    listing.write_text(f"{odd.name}\r\n{real_images['coffee']}\r\n", encoding="utf-8")
    assert [i["path"] for i in image_inputs(str(listing))] == [str(odd), str(real_images["coffee"])]


def bad_utf8(path):
    path.write_bytes(b"first caption\nsecond caption\ncaf\xe9 in latin-1\n")
    return path


def test_not_utf8_names_the_line(tmp_path):
    from eclip.embed import image_inputs, text_inputs
    with pytest.raises(EclipError, match=r"caps.txt line 3: not UTF-8"):
        text_inputs(bad_utf8(tmp_path / "caps.txt"))
    with pytest.raises(EclipError, match=r"list.txt line 3: not UTF-8"):
        image_inputs(str(bad_utf8(tmp_path / "list.txt")))


def invoke(*args):
    try:
        runner = CliRunner(mix_stderr=False)   # click < 8.2
    except TypeError:
        runner = CliRunner()
    return runner.invoke(app, [str(a) for a in args])


def test_explain_texts_keeps_its_lines(tmp_path, monkeypatch):
    monkeypatch.setenv("ECLIP_QUIET", "1")
    r = invoke("explain", "--texts", write_captions(tmp_path / "caps.txt"), "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    assert [p["caption"] for p in json.loads(r.stdout)["prompts"]] == CAPTIONS


@pytest.mark.parametrize("command", [["explain", "--dry-run"], ["embed", "--output", "{tmp}/out"]])
def test_cli_not_utf8_exits_2_naming_the_line(tmp_path, command):
    args = [a.replace("{tmp}", str(tmp_path)) for a in command]
    r = invoke(*args, "--texts", bad_utf8(tmp_path / "caps.txt"))
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and "caps.txt line 3: not UTF-8" in r.stderr, r.stderr
