"""Long work shows its progress and the time left, in a log as on a terminal."""

import io

from safetensors.torch import load_file

from minipeft import load_model
from minipeft.llama.loader import safetensors_files, tensor_bytes
from minipeft.progress import Progress, clock
from tests.helpers import write_hf_checkpoint


def test_progress_lines_in_a_log():
    log = io.StringIO()  # not a terminal: whole lines, no carriage returns
    progress = Progress("loading weights", total=4e9, stream=log, every=0)
    progress.QUIET_UNDER = 0
    progress.advance(1e9)
    progress.advance(1e9)
    progress.advance(2e9)
    progress.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 4
    assert lines[1].startswith("loading weights: 2.00 / 4.00 GB (50%), 0:00 elapsed, about 0:00 left")
    assert lines[-1].startswith("loading weights: 4.00 / 4.00 GB (100%)") and "left" not in lines[-1]
    assert (clock(59), clock(61), clock(3725)) == ("0:59", "1:01", "1:02:05")


def test_load_reports_every_byte_of_the_checkpoint(tmp_path, capsys, monkeypatch):
    write_hf_checkpoint(tmp_path, sharded=True)
    files = safetensors_files(tmp_path)
    assert len(files) > 1
    expected = sum(t.numel() * t.element_size() for f in files for t in load_file(f).values())
    assert tensor_bytes(files) == expected
    load_model(tmp_path, quantize="nf4", progress=True)  # quick: nothing to say
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(Progress, "QUIET_UNDER", 0)
    load_model(tmp_path, quantize="nf4", progress=True)
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"loading weights into NF4: {expected / 1e9:.2f} / {expected / 1e9:.2f} GB (100%)")
    load_model(tmp_path)  # progress is off unless asked for
    assert capsys.readouterr().out == ""
