"""The package's layout keeps its promises: imports run one way, and each method file holds its whole method."""

import ast
import sys
from pathlib import Path

import minipeft
from minipeft import adapter_files

PACKAGE = Path(minipeft.__file__).parent
# Each folder, and the minipeft modules it must never import: the pipeline runs llama -> methods -> files -> train.
FORBIDDEN = {"llama": ("minipeft.methods", "minipeft.train", "minipeft.adapter_files"),
             "methods": ("minipeft.train", "minipeft.adapter_files")}


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module a file imports, relative imports resolved against its package."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import lora`
    return names


def back_arrows(folder: str) -> list[str]:
    found = []
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        for name in sorted(imported_modules(path)):
            if name.startswith(FORBIDDEN[folder]):
                found.append(f"{path.relative_to(PACKAGE)} imports {name}")
    return found


def test_imports_run_one_way():
    for folder in FORBIDDEN:
        assert list((PACKAGE / folder).glob("*.py")), folder
        assert back_arrows(folder) == []


def test_the_import_check_sees_a_back_arrow(tmp_path, monkeypatch):
    """The check itself can fail: a planted relative import from llama/ into train/ is reported."""
    fake = tmp_path / "minipeft"
    (fake / "llama").mkdir(parents=True)
    (fake / "llama" / "model.py").write_text("from ..train.loop import warmup_cosine\nfrom ..methods import lora\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert back_arrows("llama") == ["llama/model.py imports minipeft.methods",
                                    "llama/model.py imports minipeft.methods.lora",
                                    "llama/model.py imports minipeft.train.loop",
                                    "llama/model.py imports minipeft.train.loop.warmup_cosine"]


def test_each_method_file_holds_its_whole_method():
    """Wrapper, add_ function, settings and both directions of its file format, in one file per method."""
    assert set(adapter_files.METHODS) == {"LORA", "PROMPT_TUNING", "PREFIX_TUNING", "IA3", "BEFT", "BOTTLENECK"}
    for peft_type, method in adapter_files.METHODS.items():
        assert Path(method.__file__).parent == PACKAGE / "methods"
        add = [name for name in vars(method) if name.startswith("add_")]
        wrappers = [v for v in vars(method).values() if isinstance(v, type) and hasattr(v, "trainable_names")]
        settings = [v for v in vars(method).values() if getattr(v, "peft_type", None) == peft_type]
        assert add and wrappers and settings and callable(method.to_peft) and callable(method.from_peft), peft_type


def test_no_shared_list_of_methods_outside_the_one_table():
    """No if/elif over peft types: the only place that names them all is adapter_files.METHODS."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "== \"LORA\"" not in text and "== \"PROMPT_TUNING\"" not in text, path
        assert "isinstance(m, LoRALayer)" not in text or path.name == "lora.py", path
