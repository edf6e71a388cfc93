"""The documentation works as written: README.md and docs/*.md.

- Every fenced ```python block runs, in order, one interpreter per page (so a page's blocks are
  one session), in a scratch directory, unless the line before it is
  `<!-- not-run: why -->`. A page whose blocks use names it does not define gets them from
  PRELUDES below (docs/internals.md says which). Marked blocks are still parsed, and checked
  statically like every other block: each `layerfast` import and attribute resolves, and each
  call of a resolved function or class binds to its real signature.
- Every `layerfast SUBCOMMAND ...` line of a ```sh block parses with the real CLI parser.
- Every inline `layerfast SUBCOMMAND --flag` and `--flag` names an option that exists (and
  `--flag a|b|c` only choices it accepts); every inline `layerfast.X.Y`, `torch.ops.layerfast.X`
  and `module.name` / `Class.attr` of layerfast resolves; every repository path and
  `tests/file.py::test_name` exists; every relative Markdown link points at a file.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import os
import pkgutil
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(\S.*?)\s*-->$")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

#: Code run before a page's blocks, defining the names its sketches use (the page says so).
PRELUDES = {
    "internals.md": """
        import torch
        from layerfast.data import open_data, to_device
        from layerfast.models import get_arch

        torch.manual_seed(0)
        num_classes, in_shape = 10, (1, 28, 28)
        _spec = get_arch("resnet20")
        path = "ckpts"
        os.makedirs(path)
        for _tau in (0, 1):
            torch.save(_spec.build(num_classes, in_shape).state_dict(), f"{path}/epoch_{_tau}.pt")
        reference_state_dict = _spec.build(num_classes, in_shape).state_dict()
        label = 0
        batch_size, device, dtype, channels_last = 1000, "cpu", torch.float32, False
        _src = open_data("fashion-mnist", max_samples=16)
        batches = [to_device(x, y, _src, "cpu") for x, y in _src.batches(8)]
        """,
}

#: What each page's runnable blocks need beyond layerfast, torch and the extension.
NEEDS = {
    "data.md": ("fashion-mnist", "ffcv"),
    "internals.md": ("fashion-mnist",),
}

#: Flags of other tools that the prose quotes in backticks.
OTHER_TOOLS = {"--no-build-isolation": "pip", "--no-cache-dir": "pip"}


# ---- reading the pages --------------------------------------------------------------------


def fences(text: str) -> list[tuple[str, int, str, str | None]]:
    """(language, line number of the first code line, code, not-run reason) per fenced block."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^\s*```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
            j += 1
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        marker = NOT_RUN.match(lines[k].strip()) if k >= 0 else None
        code = textwrap.dedent("\n".join(lines[i + 1 : j]))
        out.append((m.group(1), i + 2, code, marker.group(1) if marker else None))
        i = j + 1
    return out


def prose(text: str) -> str:
    """The page without its fenced blocks (their lines blanked, so line numbers hold)."""
    lines, inside = text.splitlines(), False
    for n, line in enumerate(lines):
        if re.match(r"^\s*```", line):
            inside = not inside
            lines[n] = ""
        elif inside:
            lines[n] = ""
    return "\n".join(lines)


def spans(text: str) -> list[tuple[int, str]]:
    """Inline code spans of the prose, with their line numbers; a span may wrap once."""
    body = prose(text)
    out = []
    for m in re.finditer(r"`([^`]+?)`", body):
        if "\n\n" not in m.group(1):
            out.append((body.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())))
    return out


def _page_items(kind: str) -> list:
    items = []
    for doc in DOCS:
        text = doc.read_text()
        if kind == "python":
            code = [(ln, c, why) for lang, ln, c, why in fences(text) if lang == "python"]
            if code:
                items.append(pytest.param(doc, code, id=doc.name))
        elif kind == "sh":
            for lang, ln, c, _ in fences(text):
                if lang in ("sh", "bash", "shell"):
                    items.append(pytest.param(doc, ln, c, id=f"{doc.name}:{ln}"))
    return items


# ---- the CLI ----------------------------------------------------------------------------


def _cli():
    from layerfast.cli import parser

    ap = parser()
    return ap, ap.commands


def _options(sub) -> dict[str, object]:
    return {s: a for a in sub._actions for s in a.option_strings}


def check_command(words: list[str]) -> str | None:
    """Why `layerfast WORDS` does not parse (None when it does)."""
    ap, _ = _cli()
    if "--help" in words or "-h" in words:
        return check_flags(words, where="")
    import contextlib
    import io

    exact = check_flags(words, where="flags")  # argparse would take `--seed` for `--seeds`
    if exact:
        return exact
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ap.parse_args(words)
    except SystemExit as exc:
        return f"exit {exc.code}: {err.getvalue().strip()}"
    return None


def check_flags(words: list[str], where: str) -> str | None:
    """Each --flag of `layerfast WORDS` exists for its subcommand; a|b|c values are choices."""
    _, commands = _cli()
    if not words or words[0] not in commands:
        return f"{where}: no subcommand {words[:1]} (have {', '.join(commands)})"
    opts = _options(commands[words[0]])
    for n, w in enumerate(words[1:], 1):
        flag = w.split("=", 1)[0]
        if not flag.startswith("--"):
            continue
        if flag not in opts:
            return f"{where}: `layerfast {words[0]}` has no {flag}"
        value = w.split("=", 1)[1] if "=" in w else (words[n + 1] if n + 1 < len(words) else "")
        bad = _bad_choices(opts[flag], value)
        if bad:
            return f"{where}: layerfast {words[0]} {flag} does not accept {bad}"
    return None


def _bad_choices(action, value: str) -> list[str]:
    choices = getattr(action, "choices", None)
    if not choices or not value or value.startswith("-"):
        return []
    return [v for v in value.split("|") if v not in choices]


def check_bare_flag(words: list[str], where: str) -> str | None:
    """`--flag [value]` quoted without a command: some subcommand has it (with that value)."""
    flag = words[0].split("=", 1)[0]
    if flag in OTHER_TOOLS:
        return None
    _, commands = _cli()
    owners = [sub for sub in commands.values() if flag in _options(sub)]
    if not owners:
        return f"{where}: no layerfast command has {flag}"
    value = words[0].split("=", 1)[1] if "=" in words[0] else (words[1] if len(words) > 1 else "")
    if all(_bad_choices(_options(sub)[flag], value) for sub in owners):
        return f"{where}: {flag} does not accept {value!r}"
    return None


# ---- names ------------------------------------------------------------------------------


@functools.cache
def _modules() -> dict[str, object]:
    """layerfast's modules by dotted and short name, the FFCV-dependent ones excepted."""
    import layerfast

    mods: dict[str, object] = {"layerfast": layerfast}
    for info in pkgutil.walk_packages(layerfast.__path__, "layerfast."):
        if info.name.endswith(("ffcv_writer", "_C", "__main__")):
            continue
        mod = importlib.import_module(info.name)
        mods[info.name] = mod
        mods.setdefault(info.name.rsplit(".", 1)[1], mod)
    return mods


@functools.cache
def _top_names() -> dict[str, object]:
    mods = _modules()
    names: dict[str, object] = {}
    for name, mod in mods.items():
        if "." not in name:
            continue
        for attr, obj in vars(mod).items():
            if getattr(obj, "__module__", "").startswith("layerfast") and not attr.startswith("_"):
                names.setdefault(attr, obj)
    return names


#: First parts that the pages use for something else than the layerfast module of that name:
#: sketch variables (`spec.init`), run.json keys (`engine.plan.passes`), file names.
NOT_MODULES = {"spec", "engine", "data", "distances", "report"}
FILE_SUFFIXES = {"csv", "png", "json", "pkl", "py", "pt", "pth", "sqlite", "npz", "beton", "md"}


def resolve(dotted: str) -> tuple[bool, str]:
    """(known, why not): is the first part layerfast's, and does the rest resolve?"""
    mods, top = _modules(), _top_names()
    parts = dotted.split(".")
    if parts[-1] in FILE_SUFFIXES or parts[0] in NOT_MODULES:
        return False, ""
    if parts[0] == "layerfast":
        if _defined_in_source(parts):
            return True, ""
        for cut in range(len(parts), 0, -1):
            name = ".".join(parts[:cut])
            try:
                obj = importlib.import_module(name)
            except ImportError:
                continue
            return True, _getattrs(obj, parts[cut:], dotted)
        return True, f"{dotted}: no such module"
    if parts[0] in mods and parts[0] != "layerfast":
        return True, _getattrs(mods[parts[0]], parts[1:], dotted)
    if parts[0] in top and inspect.isclass(top[parts[0]]):
        return True, _getattrs(top[parts[0]], parts[1:], dotted)
    return False, ""


def _defined_in_source(parts: list[str]) -> bool:
    """`layerfast.mod.NAME` found in mod's source without importing it: importing some modules
    (ffcv_writer) imports FFCV, which is slow and sets torch's thread count for the session."""
    path = ROOT.joinpath(*parts[:-1])
    file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    if len(parts) < 3 or not file.is_file():
        return False
    for node in ast.parse(file.read_text()).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == parts[-1]:
            return True
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == parts[-1] for t in node.targets
        ):
            return True
    return False


def _getattrs(obj: object, rest: list[str], dotted: str) -> str:
    for n, part in enumerate(rest):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        # an instance attribute (set in __init__ or a dataclass field) of the last class
        if inspect.isclass(obj) and n == len(rest) - 1:
            src = inspect.getsource(obj)
            if re.search(rf"(self\.{part}\b|^\s+{part}\s*:)", src, re.M):
                return ""
        return f"{dotted}: {'.'.join([dotted.split('.')[0], *rest[:n]])} has no {part!r}"
    return ""


# ---- static checks of python blocks -----------------------------------------------------


def static_check(code: str, where: str) -> list[str]:
    """Imports of layerfast resolve; calls of what they name bind to the real signatures."""
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        return [f"{where}+{(exc.lineno or 1) - 1}: not Python: {exc.msg}"]
    env: dict[str, object] = {}
    problems: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("layerfast"):
            mod = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(mod, alias.name):
                    problems.append(f"{where}: {node.module} has no {alias.name}")
                else:
                    env[alias.asname or alias.name] = getattr(mod, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("layerfast"):
                    env[alias.asname or alias.name] = importlib.import_module(alias.name)
    for node in ast.walk(tree):  # instances: `ck = CheckpointDir(...)`
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            cls = _target(node.value.func, env)
            if inspect.isclass(cls) and len(node.targets) == 1:
                if isinstance(node.targets[0], ast.Name):
                    env[node.targets[0].id] = _Instance(cls)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            obj = _target(node.value, env)
            if obj is not None and not _has(obj, node.attr):
                problems.append(f"{where}+{node.lineno - 1}: {ast.unparse(node)} does not exist")
        if isinstance(node, ast.Call):
            fn = _target(node.func, env)
            if callable(fn) and not isinstance(fn, _Instance):
                why = _binds(fn, node)
                if why:
                    problems.append(f"{where}+{node.lineno - 1}: {ast.unparse(node)}: {why}")
    return problems


class _Instance:
    def __init__(self, cls: type) -> None:
        self.cls = cls


def _has(obj: object, attr: str) -> bool:
    if isinstance(obj, _Instance):
        if hasattr(obj.cls, attr):
            return True
        return bool(re.search(rf"self\.{attr}\b", inspect.getsource(obj.cls)))
    return hasattr(obj, attr)


def _target(node: ast.AST, env: dict[str, object]) -> object | None:
    if isinstance(node, ast.Name):
        return env.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _target(node.value, env)
        if isinstance(base, _Instance):
            method = getattr(base.cls, node.attr, None)
            return _Bound(method) if inspect.isfunction(method) else None
        if base is not None and hasattr(base, node.attr):
            return getattr(base, node.attr)
    return None


class _Bound:
    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self) -> None:  # pragma: no cover - only its signature is read
        pass


def _binds(fn, call: ast.Call) -> str | None:
    target = fn.fn if isinstance(fn, _Bound) else fn
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    args = [None] * len(call.args)
    if isinstance(fn, _Bound):
        args.insert(0, None)
    if any(isinstance(a, ast.Starred) for a in call.args):
        return None
    kwargs = {k.arg: None for k in call.keywords if k.arg is not None}
    try:
        sig.bind_partial(*args, **kwargs)
    except TypeError as exc:
        return f"does not match {getattr(target, '__qualname__', target)}{sig}: {exc}"
    return None


# ---- the tests ----------------------------------------------------------------------------


@pytest.mark.parametrize(("doc", "blocks"), _page_items("python"))
def test_python_blocks_run(doc: Path, blocks: list, tmp_path: Path) -> None:
    rel = doc.relative_to(ROOT).as_posix()
    problems, run = [], []
    for line, code, why in blocks:
        problems += static_check(code, f"{rel}:{line}")
        if why is None:
            run.append(f"# {rel}:{line}\n{code}")
    assert not problems, "\n".join(problems)
    if not run:
        return
    for need in NEEDS.get(doc.name, ()):
        _need(need)
    prelude = textwrap.dedent(PRELUDES.get(doc.name, ""))
    script = "import os\n" + prelude + "\n" + "\n\n".join(run)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, f"{rel}: a python block failed:\n{proc.stderr[-3000:]}"


def _need(what: str) -> None:
    if what == "fashion-mnist" and not FASHION_MNIST.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    if what == "ffcv":
        try:
            import ffcv  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - FFCV fails to import in several ways
            if os.environ.get("CI"):
                pytest.fail(f"CI is set but FFCV does not import ({exc})", pytrace=False)
            pytest.skip("needs FFCV (pip install -e '.[ffcv]')")


def sh_commands(code: str) -> list[list[str]]:
    """The `layerfast ...` commands of a shell block, as words (variables read as 0)."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line)
        for part in re.split(r"&&|;|\|\|", line):
            words = shlex.split(re.sub(r"\$\{?\w+\}?", "0", part), comments=True)
            while words and words[0] in ("do", "then", "time", "sudo"):
                words = words[1:]
            if words[:1] == ["layerfast"]:
                out.append(words[1:])
    return out


@pytest.mark.parametrize(("doc", "line", "code"), _page_items("sh"))
def test_shell_commands_parse(doc: Path, line: int, code: str) -> None:
    rel = doc.relative_to(ROOT).as_posix()
    problems = []
    for words in sh_commands(code):
        why = check_command(words)
        if why:
            problems.append(f"{rel}:{line}: layerfast {' '.join(words)}: {why}")
    for m in re.finditer(r"(?:^|&&|;)\s*(?:python3?|bash)\s+((?:scripts|\.ci)/\S+)", code, re.M):
        if not (ROOT / m.group(1)).is_file():
            problems.append(f"{rel}:{line}: {m.group(1)} does not exist")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_inline_flags_exist(doc: Path) -> None:
    rel = doc.relative_to(ROOT).as_posix()
    problems = []
    for line, span in spans(doc.read_text()):
        words = span.split()
        where = f"{rel}:{line} `{span}`"
        why = None
        if words[0] == "layerfast" and len(words) > 1 and not words[1].startswith("-"):
            why = check_flags(words[1:], where)
        elif re.match(r"^--[a-z]", words[0]):
            why = check_bare_flag(words, where)
        if why:
            problems.append(why)
    assert not problems, "\n".join(problems)


PATH_RE = re.compile(r"^\.?[\w.-]+(/[\w.*-]+)+(::\w+)?$|^[\w-]+\.(py|sh|h|cpp|cu)(::\w+)?$")
DOTTED_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+(\(\))?$")


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_inline_names_and_paths_exist(doc: Path) -> None:
    import torch

    rel = doc.relative_to(ROOT).as_posix()
    problems = []
    text = doc.read_text()
    for line, span in spans(text):
        where = f"{rel}:{line} `{span}`"
        name = re.sub(r"\(.*\)$", "", span)
        if name.startswith("torch.ops.layerfast.") and not name.endswith("*"):
            if not hasattr(torch.ops.layerfast, name.split(".")[3]):
                problems.append(f"{where}: no such op")
        elif name.startswith("layerfast::"):
            if not hasattr(torch.ops.layerfast, name.split("::")[1]):
                problems.append(f"{where}: no such op")
        elif PATH_RE.match(span) and not span.startswith(("http", "runs/", "$")):
            why = _path_problem(span)
            if why:
                problems.append(f"{where}: {why}")
        elif DOTTED_RE.match(name.replace("()", "")):
            known, why = resolve(name.replace("()", ""))
            if known and why:
                problems.append(f"{where}: {why}")
    for m in re.finditer(r"\]\(([^)#\s]+)\)", prose(text)):
        target = m.group(1)
        if not target.startswith("http") and not (doc.parent / target).exists():
            problems.append(f"{rel}: link to {target} does not exist")
    assert not problems, "\n".join(problems)


#: Path prefixes that name files of this repository (from its root or from layerfast/).
TREE_ROOTS = ("layerfast/", "tests/", "scripts/", "benchmarks/", "csrc/", "docs/", ".ci/")
TREE_ROOTS += ("engine/", "data/", "checkpoints/", "models/", "report/")


@functools.cache
def _file_names() -> set[str]:
    names = set()
    for _top, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") or d == ".ci"]
        dirs[:] = [d for d in dirs if d not in ("build", "runs", "__pycache__")]
        names.update(files)
    return names


def _path_problem(span: str) -> str | None:
    path, _, test = span.partition("::")
    if "*" in path or "<" in path or path.upper() == path:
        return None
    bases = [ROOT, ROOT / "layerfast"]
    if "/" not in path:  # a bare file name: anywhere in the tree
        if path not in _file_names():
            return f"no file {path} in the repository"
        return None
    if not path.startswith(TREE_ROOTS):
        return None
    hits = [b / path for b in bases if (b / path).exists()]
    if not hits:
        return f"{path} does not exist"
    if test and not re.search(rf"^def {test}\b", hits[0].read_text(), re.M):
        return f"{path} has no {test}"
    return None


# ---- the checker itself can fail ------------------------------------------------------------


def test_the_checks_catch_broken_docs() -> None:
    """A wrong flag, choice, name, signature or path in a copy of a page is reported."""
    assert check_command(["analyze", "--arch", "fcn3x256", "--sedes", "3"])
    assert check_command(["analyze", "--arch", "fcn3x256", "--bn", "reset"])
    assert check_command(["analyze", "--arch", "fcn3x256", "--seeds", "3"]) is None
    assert check_flags(["bench", "--glue", "fused|fast"], "x")
    assert check_bare_flag(["--granularity", "layer|module"], "x")
    assert check_bare_flag(["--no-build-isolation"], "x") is None
    assert resolve("layerfast.data.ffcv_available") == (True, "")
    assert resolve("layerfast.data.open_dataset")[1]
    assert resolve("Program.keep_inplace") == (True, "")
    assert resolve("Evaluator.plan_batches")[1]
    assert resolve("fanrun.Fold") == (True, "")
    assert resolve("analysis.MAX_SEED")[1]
    assert _path_problem("tests/engine/test_engine.py::test_swap_path_is_bit_exact") is None
    assert _path_problem("tests/engine/test_engine.py::test_no_such_test")
    assert _path_problem("layerfast/report.py")
    wrong = "from layerfast.checkpoints import CheckpointDir\nck = CheckpointDir(p, finale=None)\n"
    assert static_check(wrong, "x")
    wrong = "from layerfast.checkpoints import CheckpointDir\nck = CheckpointDir(p)\nck.tensor(0)\n"
    assert static_check(wrong, "x")
    assert static_check("from layerfast.units import make_unit\n", "x")
    right = (
        "from layerfast.checkpoints import CheckpointDir\nck = CheckpointDir(p)\nck.tensors(0)\n"
    )
    assert static_check(right, "x") == []
    page = "Run:\n\n```sh\nlayerfast analyze --arch fcn3x256 --seed 3\n```\n"
    assert [why for w in sh_commands(fences(page)[0][2]) if (why := check_command(w))]
    page = "Text\n\n<!-- not-run: needs a GPU -->\n```python\nx = 1\n```\n"
    assert fences(page) == [("python", 5, "x = 1", "needs a GPU")]
