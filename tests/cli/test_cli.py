"""The `xgenmm` command line against a tiny random checkpoint: chat streams to stdout (and the REPL keeps history),
caption skips what is done and reports unreadable files, download / missing weights say what to run, bench and
serve pass their options on, and the console script is installed."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import EXAMPLES as EXAMPLE_DIR
from xgenmm import LLM, SamplingParams
from xgenmm.cli import main
from xgenmm.cli.chat import ChatSession, repl

EXAMPLES = EXAMPLE_DIR / "images"
ENGINE = ["--device", "cpu", "--dtype", "float32", "--kv-cache-memory", "64MiB"]


class RecordingStdout(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def test_chat_streams_the_answer_to_stdout(tiny_checkpoint, monkeypatch, capsys):
    out = RecordingStdout()
    monkeypatch.setattr(sys, "stdout", out)
    image = EXAMPLES / "house.png"
    rc = main(["chat", "--model", str(tiny_checkpoint), *ENGINE, "--image", str(image), "--max-tokens", "6",
               "What is in this image?"])
    assert rc == 0
    pieces = [w for w in out.writes if w and w != "\n"]
    assert len(pieces) >= 3  # token by token, not one block at the end
    assert out.getvalue().endswith("\n")

    llm = LLM(str(tiny_checkpoint), device="cpu", dtype="float32")  # the same shared engine
    messages = [{"role": "user", "content": [{"type": "image_pil", "image_pil": _open(image)},
                                             {"type": "text", "text": "What is in this image?"}]}]
    expected = llm.chat(messages, SamplingParams(max_tokens=6, temperature=0.0))[0].outputs[0].text
    assert "".join(pieces) == expected


def _open(path: Path):
    from PIL import Image

    img = Image.open(path)
    img.load()
    return img


def test_repl_keeps_history_and_resets(tiny_checkpoint, monkeypatch):
    llm = LLM(str(tiny_checkpoint), device="cpu", dtype="float32", kv_cache_memory_bytes=64 * 1024**2)
    from xgenmm import RequestOutputKind

    session = ChatSession(llm, SamplingParams(max_tokens=3, temperature=0.0, output_kind=RequestOutputKind.DELTA),
                          out=io.StringIO())
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {EXAMPLES / 'bar_chart.png'}\nfirst question\n"
                                                  "second question\n/nonsense\n"))
    assert repl(session, []) == 0
    roles = [m["role"] for m in session.messages]
    assert roles == ["user", "assistant", "user", "assistant"]
    first = session.messages[0]["content"]
    assert first[0]["type"] == "image" and first[-1]["text"] == "first question"  # /image attached to the next turn
    assert session.messages[2]["content"] == "second question"

    monkeypatch.setattr(sys, "stdin", io.StringIO("/reset\nthird\n/exit\nnever read\n"))
    assert repl(session, []) == 0
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["third"]


def _caption(folder: Path, out: Path, checkpoint: Path) -> int:
    return main(["caption", str(folder), "--out", str(out), "--model", str(checkpoint), *ENGINE, "--max-tokens", "4",
                 "--no-progress", "--concurrency", "4"])


def test_caption_skips_done_files_and_reports_unreadable_ones(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(EXAMPLES / "house.png", folder / "house.png")
    shutil.copy(EXAMPLES / "stop_sign.jpg", folder / "sub" / "stop.jpg")  # not included without --recursive
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (folder / "notes.txt").write_text("not an image, ignored")
    out = tmp_path / "captions.jsonl"

    assert _caption(folder, out, tiny_checkpoint) == 0
    err = capsys.readouterr().err
    assert "broken.png" in err and "unreadable" in err
    entries = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["file"] for e in entries] == ["house.png"]
    assert entries[0]["caption"] and entries[0]["num_tokens"] == 4

    # a rerun skips house.png, retries broken.png (still unreadable), and picks up a new image
    shutil.copy(EXAMPLES / "bar_chart.png", folder / "chart.png")
    with out.open("a") as f:
        f.write('{"file": "half-written')  # a previous run killed mid-line
    assert _caption(folder, out, tiny_checkpoint) == 0
    err = capsys.readouterr().err
    assert "1 image(s) already captioned" in err and "broken.png" in err
    lines = out.read_text().splitlines()
    files = [json.loads(line)["file"] for line in lines if line.startswith('{"file": "') and line.endswith("}")]
    assert sorted(files) == ["chart.png", "house.png"]

    assert _caption(folder, out, tiny_checkpoint) == 0
    assert "2 image(s) already captioned" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == len(lines)


def test_missing_weights_say_what_to_run(capsys):
    rc = main(["chat", "--model", "Salesforce/not-a-downloaded-model", "hello"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "xgenmm download Salesforce/not-a-downloaded-model" in err
    assert "--model PATH" in err


def test_download_offline_error_from_the_console_script(tmp_path):
    script = Path(sys.executable).parent / "xgenmm"
    assert script.is_file(), "the xgenmm console script is not installed (pip install -e .)"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([str(script), "download", "Salesforce/xgen-mm-phi3-mini-instruct-interleave-r-v1.5"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "could not download" in proc.stderr and "HF_HUB_OFFLINE is set" in proc.stderr
    assert "xgenmm download Salesforce/xgen-mm-phi3-mini-instruct-interleave-r-v1.5" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_passes_options_to_the_benchmark(tmp_path):
    script = tmp_path / "fake_throughput.py"
    record = tmp_path / "argv.json"
    script.write_text(f"import json\ndef main(argv=None):\n    json.dump(argv, open({str(record)!r}, 'w'))\n"
                      "    return 0\n")
    assert main(["bench", "--script", str(script), "--model", "m", "--dtype", "bfloat16", "--num-prompts", "3"]) == 0
    assert json.loads(record.read_text()) == ["--model", "m", "--dtype", "bfloat16", "--num-prompts", "3"]
    # a main() without parameters reads sys.argv; a non-int result (e.g. a report path) is success
    script.write_text(f"import json, sys\ndef main():\n    json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n"
                      "    return 'report.json'\n")
    assert main(["bench", "--script", str(script), "--warmup", "1"]) == 0
    assert json.loads(record.read_text()) == ["--warmup", "1"]
    with pytest.raises(SystemExit):
        main(["chat", "--no-such-option", "x"])  # only bench passes unknown options on


def test_serve_builds_its_config(tiny_checkpoint, monkeypatch):
    import xgenmm.server

    seen = {}
    monkeypatch.setattr(xgenmm.server, "run_server", lambda config: seen.setdefault("config", config))
    rc = main(["serve", "--model", str(tiny_checkpoint), *ENGINE, "--port", "8123", "--api-key", "k",
               "--allow-remote-images", "--max-images-per-request", "3", "--max-request-bytes", "1MiB"])
    assert rc == 0
    config = seen["config"]
    assert (config.host, config.port, config.api_key) == ("127.0.0.1", 8123, "k")
    assert config.allow_remote_images and config.max_images_per_request == 3
    assert config.max_request_bytes == 1024**2
    assert config.engine_options == {"kv_cache_memory_bytes": 64 * 1024**2}


def test_make_random_checkpoint(tmp_path, capsys):
    assert main(["make-random-checkpoint", str(tmp_path / "ckpt"), "--preset", "tiny"]) == 0
    assert (tmp_path / "ckpt" / "config.json").is_file()
    assert str(tmp_path / "ckpt") in capsys.readouterr().out
