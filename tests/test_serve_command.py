"""`minipeft serve` as a command (it serves until Ctrl-C; a mistake is one line and exit code 2), and one
stream's text, said only once it is sure (stop strings, characters split across tokens)."""

import json
import re
import signal
import subprocess
import sys
import urllib.request

from minipeft.serve.streams import Stream
from tests.helpers import ROOT


def test_the_command_serves_until_ctrl_c_and_refuses_bad_arguments(default_weights, tmp_path):
    command = [sys.executable, "-m", "minipeft", "serve", "--weights", str(default_weights), "--port", "0"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        line = next(line for line in process.stderr if line.startswith("serving"))
        url = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line).group(1)  # localhost unless --host says otherwise
        with urllib.request.urlopen(url + "/v1/models", timeout=30) as response:
            assert json.loads(response.read())["data"][0]["id"] == default_weights.name
        with urllib.request.urlopen(url + "/", timeout=30) as response:
            assert b"<title>minipeft serve</title>" in response.read()  # the page, from the package itself
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    bad = subprocess.run([*command, "--adapter", f"x={tmp_path / 'absent'}"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'absent' / 'adapter_config.json'}: not found (an adapter directory holds "
        f"adapter_config.json and adapter_model.safetensors)"]


def test_a_stream_never_says_what_may_be_a_stop_string_or_half_a_character():
    """Token by token, text is said once it is sure: a stop string that spans tokens is never said, not even
    its start, and a character whose bytes are still coming waits for them."""
    pieces = {0: "Hel", 1: "lo", 2: " wo", 3: "rld", 4: "caf", 5: "\ufffd", 6: "é!"}  # 5: half of 'é'
    decode = lambda ids: "".join(pieces[i] for i in ids if i != 5 or ids[-1] == 5).replace("\ufffdé", "é")
    said = lambda stream: [event[2] for event in list(stream.events.queue) if event[0] == "text"]

    stream = Stream([9], None, max_tokens=10, stop=("lo wor",))
    assert [stream.take(t, decode) for t in (0, 1, 2, 3)] == [None, None, None, "stop"]
    assert said(stream) == ["He", "l"] and stream.events.queue[-1][2] == "stop"  # each "l...", "lo wo": held back

    stream = Stream([9], None, max_tokens=10, stop=("xyz",))
    for token in (4, 5):
        stream.take(token, decode)
    assert said(stream) == ["caf"]  # not "caf\ufffd"
    stream.take(6, decode)
    assert said(stream) == ["caf", "é!"]
    assert Stream([9], None, max_tokens=2).take(0, decode) is None
    ended = Stream([9], None, max_tokens=1, stop_ids=(7,))
    assert ended.take(7, decode) == "stop" and ended.events.queue[-1][3]["completion_tokens"] == 0
