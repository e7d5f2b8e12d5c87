"""The package's layout keeps its promises: imports run one way, and each method file holds its whole method."""

import ast
import sys
from pathlib import Path

import minipeft
from minipeft import formats

PACKAGE = Path(minipeft.__file__).parent
# Each folder, and the minipeft modules it must never import: the pipeline runs llama -> methods -> formats -> train.
# serve/ sits on top of them all, and none of them imports it.
# tools/ stands beside them all, and nothing in them imports it.
FORBIDDEN = {"llama": ("minipeft.methods", "minipeft.train", "minipeft.formats", "minipeft.serve", "minipeft.tools"),
             "methods": ("minipeft.train", "minipeft.formats", "minipeft.serve", "minipeft.tools"),
             "formats": ("minipeft.train", "minipeft.serve", "minipeft.tools"),
             "train": ("minipeft.serve", "minipeft.tools"),
             "serve": ("minipeft.tools", "minipeft.cli")}


def imported_modules(path: Path, root: Path = None) -> set[str]:
    """Absolute names of every module a file imports, relative imports resolved against its package."""
    package = ".".join(path.relative_to((root or PACKAGE).parent).with_suffix("").parts[:-1])
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


def import_graph(package: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, at any depth (an import inside a function counts). A module's
    own parent packages are left out: Python imports them first whatever the module says."""
    modules = {".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__"): path
               for path in package.rglob("*.py")}
    return {name: {m for m in imported_modules(path, package) if m in modules and m != name
                   and not name.startswith(f"{m}.")} for name, path in modules.items()}


def import_loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import one another, round a loop (strongly connected, more than one)."""
    reaches = {name: set() for name in graph}
    for name in graph:
        todo = list(graph[name])
        while todo:
            other = todo.pop()
            if other not in reaches[name]:
                reaches[name].add(other)
                todo += graph[other]
    groups = {tuple(sorted({name} | {o for o in reaches[name] if name in reaches[o]})) for name in graph
              if name in reaches[name]}
    return sorted(list(group) for group in groups)


def test_no_import_loops():
    assert import_loops(import_graph(PACKAGE)) == []


def test_the_loop_check_sees_a_loop(tmp_path):
    """Planted: a function-level import back from serve/ into the command line module, as serve once had."""
    fake = tmp_path / "minipeft"
    (fake / "serve").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "cli.py").write_text("from .serve import start\nfrom . import errors\n")
    (fake / "errors.py").write_text("")
    (fake / "serve" / "__init__.py").write_text("from .engine import Engine\n\ndef start():\n"
                                                "    from ..cli import base_for\n")
    (fake / "serve" / "engine.py").write_text("from .. import errors\n")
    assert import_loops(import_graph(fake)) == [["minipeft.cli", "minipeft.serve"]]


def test_each_method_file_holds_its_method_and_its_format_is_one_entry():
    """Wrapper, add_ function and settings in one file per method; its file format is one entry in formats/."""
    assert set(formats.FORMATS) == {"LORA", "LOHA", "LOKR", "VERA", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "IA3",
                                    "BEFT", "LN_TUNING", "BOTTLENECK", "LOPT", "EPT", "IAPT"}
    assert len(formats.BY_SETTINGS) == len(formats.FORMATS) + 1  # ALoRA is written as a LoRA file
    for peft_type, entry in formats.BY_SETTINGS.items():
        method = sys.modules[entry.settings.__module__]
        assert Path(method.__file__).parent == PACKAGE / "methods"
        add = [name for name in vars(method) if name.startswith("add_")]
        wrappers = [v for v in vars(method).values() if isinstance(v, type) and hasattr(v, "trainable_names")]
        assert add and wrappers and callable(entry.write) and callable(entry.read), peft_type
        assert Path(sys.modules[entry.write.__module__].__file__).parent == PACKAGE / "formats", peft_type


def test_method_files_name_no_peft_keys():
    """peft's key names live in formats/: no string constant in a method file's code is one of them."""
    keys = {key for entry in formats.FORMATS.values()
            for key in (*entry.keys.read, *entry.keys.not_math, *entry.keys.only_default)} - {"format"}
    keys |= {"peft_type", "task_type", "base_model.model."}
    for path in (PACKAGE / "methods").glob("*.py"):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                   and isinstance(node.value, str) and id(node) not in docstrings}
        assert strings & keys == set(), (path.name, strings & keys)


def test_no_shared_list_of_methods_outside_the_one_table():
    """No if/elif over peft types: the only place that names them all is formats.FORMATS."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "== \"LORA\"" not in text and "== \"PROMPT_TUNING\"" not in text, path
        assert "isinstance(m, LoRALayer)" not in text or path.name == "lora.py", path


METHOD_FILES = ("lora", "dora", "loha", "lokr", "vera", "ln_tuning", "ia3", "bitfit", "bottleneck", "prompt_tuning",
                "p_tuning", "prefix_tuning", "lopt", "task_head", "alora", "ept", "iapt", "plug_and_play")


def test_a_method_file_holds_its_method_and_no_routing():
    """Each method's file is short enough to read whole, and never sees rows or other adapters: it does not
    import the row router (named_adapters); its wrappers inherit the contract (contract.Wrapper)."""
    from minipeft.methods.contract import Wrapper

    for name in METHOD_FILES:
        path = PACKAGE / "methods" / f"{name}.py"
        assert len(path.read_text().splitlines()) <= 150, name
        siblings = {m.split(".")[2] for m in imported_modules(path) if m.count(".") >= 2 and
                    m.startswith("minipeft.methods.")}
        # the contract, and the method a method builds on: DoRA is LoRA's option, ALoRA a LoRA with gates, LoPT a
        # low-rank prompt tuning, Plug and Play prompts prompt tuning's prompts under another objective, LN tuning
        # BitFit's trained gains alone
        assert siblings <= {"contract", "lora", "dora", "prompt_tuning", "lopt", "bitfit"}, (name, siblings)
        module = sys.modules[f"minipeft.methods.{name}"]
        wrappers = [v for v in vars(module).values() if isinstance(v, type) and hasattr(v, "trainable_names")]
        assert wrappers and all(issubclass(w, Wrapper) for w in wrappers), name


def test_lines_are_at_most_120_characters():
    root = PACKAGE.parent
    for path in [*root.glob("*.py"), *(root / "minipeft").rglob("*.py"), *(root / "tests").glob("*.py"),
                 *(root / "bench").glob("*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert len(line) <= 120, f"{path.relative_to(root)}:{number} has {len(line)} characters"


def code_words(source: str) -> set[str]:
    """Every name and string in a file's code: comments and docstrings left out."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    words = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and id(node) not in docstrings}
    words |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    words |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    words |= {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
              for alias in node.names}
    return words


def test_peft_is_named_in_method_files_only_in_prose():
    """`git grep -i peft minipeft/methods` finds docstrings and comments: no name or message in the code."""
    assert {w for w in code_words('"""As in peft."""\nx = peft_key  # as peft\n') if "peft" in w} == {"peft_key"}
    for path in (PACKAGE / "methods").glob("*.py"):
        assert {w for w in code_words(path.read_text()) if "peft" in w.lower()} == set(), path.name


METHOD_FILES_OF = {"prompt tuning": ["prompt_tuning"], "P-tuning": ["p_tuning", "prompt_tuning"],
                   "LoPT": ["lopt", "prompt_tuning"],
                   "EPT": ["ept", "prompt_tuning"], "IAPT": ["iapt"], "prefix tuning": ["prefix_tuning"],
                   "LoRA": ["lora"], "DoRA": ["dora", "lora"], "LoHa": ["loha"], "LoKr": ["lokr"], "VeRA": ["vera"],
                   "LN tuning": ["ln_tuning", "bitfit"], "ALoRA": ["alora", "lora"], "IA3": ["ia3"],
                   "BitFit": ["bitfit"], "bottleneck": ["bottleneck"]}
SHARED = {"add": {"contract", "placing", "freezing", "named_adapters", "merging"},
          "forward": {"contract", "named_adapters", "placing"},
          "merge": {"merging", "contract", "named_adapters"}}


def test_what_a_reader_follows_for_each_method_is_its_file_and_the_shared_ones():
    """README's claim, measured by tracing (bench/reading_paths.py): add_X, the forward and merge run the method's
    own file(s) and the shared files named in SHARED, nothing else outside llama/; and LoRA's forward on a batch of
    one adapter reaches its formula in two steps (Wrapper.forward, then adapt_output)."""
    sys.path.insert(0, str(PACKAGE.parent / "bench"))
    import reading_paths

    for name, add in reading_paths.methods().items():
        found = reading_paths.paths(name, add)
        for step, shared in SHARED.items():
            files = {Path(f).stem for f in found.get(step, ({}, 0))[0]}
            assert files <= shared | set(METHOD_FILES_OF[name]), (name, step, files)
    forward = reading_paths.paths("LoRA", reading_paths.methods()["LoRA"])["forward"][0]
    assert forward == {"methods/contract.py": ["Wrapper.forward", "Wrapper.adapt_input", "matmul_input"],
                       "methods/lora.py": ["LoRALayer.adapt_output"]}


def test_the_scripts_import_few_names_from_the_project():
    """train_fox.py and train_code.py read like the course's cells: the training side is one name, `train`."""
    for script in ("train_fox.py", "train_code.py"):
        tree = ast.parse((PACKAGE.parent / script).read_text())
        names = [alias.asname or alias.name for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                 and (getattr(node, "module", None) or node.names[0].name).startswith("minipeft")
                 for alias in node.names]
        assert len(names) <= 7, (script, names)
