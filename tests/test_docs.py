"""The documentation runs: every ```python block of docs/*.md and README.md is executed, and docs/api.md
names every public name of the package.

Blocks of one file run in order in one namespace (a fresh module per file), so later blocks use names
defined earlier. A block fenced as ```python no-run is shown but not executed; shell commands use
```bash fences and are never run. Blocks run in a temporary working directory, with one torch thread
(tiny tensors: thread wake-ups would cost more than the work) and with `icecache.models.load_default()`
returning the session's embedded model, so a doc that loads the model costs one generation, not a load.
Indexes a doc registers are unregistered afterwards, so they never leak into other tests.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DOC_FILES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")

#: modules whose `__all__` api.md must cover
ALL_MODULES = ["icecache", "icecache.index", "icecache.runtime", "icecache.kernels"]
#: modules without `__all__`: api.md must cover the functions and classes they define
DEFINED_MODULES = ["icecache.models", "icecache.tasks"]


def code_blocks(path: Path) -> list[tuple[int, str, list[str], str]]:
    """`(first code line, language, flags, code)` of every fenced block of a Markdown file (1-based line)."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, info = opening.groups()
        words = info.strip().split()
        start, i = i + 1, i + 1
        while i < len(lines):
            closing = FENCE.match(lines[i])
            if closing and closing.group(2).startswith(fence) and not closing.group(3).strip():
                break
            i += 1
        else:
            raise AssertionError(f"{path.name}:{start}: fenced block never closed")
        body = [line[len(indent):] if line.startswith(indent) else line for line in lines[start:i]]
        blocks.append((start + 1, words[0].lower() if words else "", words[1:], "\n".join(body) + "\n"))
        i += 1
    return blocks


def runnable(path: Path) -> list[tuple[int, str]]:
    return [(line, code) for line, lang, flags, code in code_blocks(path)
            if lang in ("python", "py") and "no-run" not in flags]


@pytest.fixture
def doc_env(request, monkeypatch, tmp_path):
    """Isolation for one doc file: temp cwd, one torch thread, registry restored, shared model."""
    from icecache.index import base

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    registry = dict(base._REGISTRY)
    model_state = {}

    def use_shared_model(names: set[str]):
        import icecache.models

        real = icecache.models.load_default
        model, tokenizer = request.getfixturevalue("smollm")
        model_state["model"], model_state["attn"] = model, model.config._attn_implementation

        def load_default(*args, **kwargs):
            return (model, tokenizer) if not args and not kwargs else real(*args, **kwargs)

        monkeypatch.setattr(icecache.models, "load_default", load_default)
        real_load_model = icecache.models.load_model
        fixtures = {"smollm2-135m": "smollm", "gemma3-270m": "gemma"}
        shared = {"smollm2-135m": (model, tokenizer)}
        for name in names - set(shared):  # resolved now: pytest refuses new fixtures mid-test
            shared[name] = request.getfixturevalue(fixtures[name])
            model_state.setdefault("others", []).append((shared[name][0], shared[name][0].config._attn_implementation))

        def load_model(name="smollm2-135m", *args, **kwargs):
            if args or kwargs or name not in shared:
                return real_load_model(name, *args, **kwargs)
            return shared[name]

        monkeypatch.setattr(icecache.models, "load_model", load_model)

    yield use_shared_model
    torch.set_num_threads(threads)
    base._REGISTRY.clear()
    base._REGISTRY.update(registry)
    if model_state:
        for model, attn in [(model_state["model"], model_state["attn"]), *model_state.get("others", [])]:
            model.set_attn_implementation(attn)


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run(path: Path, doc_env) -> None:
    blocks = runnable(path)
    if not blocks:
        pytest.skip(f"{path.name} has no python blocks to run")
    if any("load_default" in code or "load_model" in code for _, code in blocks):
        doc_env({name for name in ("gemma3-270m",) if any(name in code for _, code in blocks)})
    name = f"_docs_{path.stem.lower()}"
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    try:
        for line, code in blocks:
            # pad with blank lines so that tracebacks point at the Markdown file's own line numbers
            compiled = compile("\n" * (line - 1) + code, str(path), "exec")
            try:
                exec(compiled, module.__dict__)
            except Exception as error:
                raise AssertionError(
                    f"{path.relative_to(ROOT)}: the python block at line {line} failed: "
                    f"{type(error).__name__}: {error}") from error
    finally:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_fences_are_labelled(path: Path) -> None:
    """Every block says what it is, so that no python example hides in an unlabelled (unrun) fence."""
    unlabelled = [line for line, lang, _, _ in code_blocks(path) if not lang]
    assert not unlabelled, f"{path.relative_to(ROOT)}: fenced blocks without a language at lines {unlabelled}"


def public_names(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    if module_name in ALL_MODULES:
        return list(module.__all__)
    return [name for name, obj in vars(module).items()
            if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)
                                            or callable(getattr(obj, "__wrapped__", None)))
            and getattr(obj, "__module__", None) == module_name]


@pytest.mark.parametrize("module_name", ALL_MODULES + DEFINED_MODULES)
def test_api_reference_names_every_public_name(module_name: str) -> None:
    text = (DOCS / "api.md").read_text()
    names = public_names(module_name)
    assert names, f"found no public names in {module_name}"
    missing = [n for n in names if not re.search(rf"(?<![\w]){re.escape(n)}(?!\w)", text)]
    assert not missing, f"docs/api.md does not mention these public names of {module_name}: {missing}"


def test_index_lists_every_page() -> None:
    index = (DOCS / "index.md").read_text()
    linked = set(re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", index))
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    assert not pages - linked, f"docs/index.md does not link {sorted(pages - linked)}"
    assert not {p for p in linked if not (DOCS / p).is_file()}, "docs/index.md links missing pages"


def test_api_reference_lists_every_index_option_with_its_default() -> None:
    import ast
    import dataclasses

    import icecache

    rows = {m.group(1): m.group(2) for m in re.finditer(r'^\| `"([\w-]+)"` \| `\w+` \(`[\w.]+`\) \| (.*) \|$',
                                                         (DOCS / "api.md").read_text(), re.MULTILINE)}
    builtin = [n for n in icecache.available_indexes() if icecache.index.index_class(n).__module__.startswith("icecache.")]
    assert sorted(rows) == sorted(builtin)
    for name, cell in rows.items():
        documented = {k: ast.literal_eval(v) for k, v in re.findall(r"`(\w+)=([^`]+)`", cell)}
        fields = {f.name: f.default for f in dataclasses.fields(icecache.index.index_class(name).Options)}
        assert documented == fields, name
        assert (cell == "none") == (not fields), name
