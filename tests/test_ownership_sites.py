"""Every place in nucseg/ and cli/ that creates, replaces, truncates or deletes a path goes through the one
ownership mechanism of :mod:`nucseg.io` (its module docstring states the rule).

The test walks the syntax tree of every module and finds each *site*: a call that writes or removes a path by
itself (``open(..., "w")``, ``Path.write_text``, ``unlink``, ``rmtree``, ``os.replace``, ``shutil.move``,
``safetensors.save_file``, ``torch.save``, ``savefig``, ``tifffile.imwrite``, ``TiffWriter``, ``ParquetWriter``,
``zarr.open_group(mode="w")``, ``ZipFile.extractall``, ...). A site is accepted only if

* it writes into a path the mechanism handed out in the same function: the temporary of ``atomic_path`` (or of
  ``resumable_file``, ``claim``, ``tempfile``), or a handle opened on one; or
* it is one of the mechanism's own internals, listed in ``INTERNALS`` below, each with the reason.

So a new writer that opens its output directly, or deletes something without asking, fails here.
Handle-level calls (``fh.write``, ``os.write(fd)``, ``group.create_array``) are not sites: the site is where the
handle was opened. ``mkdir`` is not one either: creating an empty folder destroys nothing.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nucseg", "cli")

# Calls that hand out a path (or a descriptor on one) that is nucseg's to write: what a site may write into.
BINDERS = {"atomic_path", "resumable_file", "claim", "TemporaryDirectory", "mkdtemp", "mkstemp",
           "NamedTemporaryFile"}

# The mechanism's own internals (nucseg/io.py), the only places that touch existing paths directly.
INTERNALS = {
    "atomic_path",  # creates its temporary (O_EXCL), renames it onto the checked path, removes it on failure
    "_remove",  # removes a temporary of atomic_path / a stale one of a dead writer (remove_stale_temps)
    "remove_stale_temps",  # opens a leftover temporary's guard to test its lock (O_RDWR, no write)
    "writable_dir",  # touches and removes its own fresh, randomly named probe
    "apply_umask",  # chmod of what atomic_path just created, before the rename
    "open_append",  # the one append: O_EXCL create, or an owned file, O_NOFOLLOW
    "remove_owned",  # the one deletion: owned paths only, never a symbolic link
    "_unmark",  # removes a download sidecar that carries nucseg's marker
    "resumable_file",  # creates (O_EXCL) or reopens (owned, O_NOFOLLOW) a download's .part
    "promote_download",  # renames an owned .part onto a final path that is absent or an owned download
    "locked",  # opens (O_CREAT, O_NOFOLLOW) a lock file it never writes
}

_WRITE_METHODS = {"write_text", "write_bytes", "touch", "unlink", "rmdir", "symlink_to", "hardlink_to",
                  "savefig", "save_pretrained", "extractall", "to_parquet", "to_zarr"}
_WRITE_FUNCS = {"save_file", "imwrite", "imsave", "TiffWriter", "ParquetWriter", "rmtree", "copytree", "copyfile",
                "copy2", "symlink", "link", "truncate", "chmod", "savez", "savez_compressed", "mkdtemp", "mkstemp",
                "NamedTemporaryFile", "TemporaryDirectory"}
_OS_PATH_FUNCS = {"remove", "unlink", "rmdir", "rename", "replace", "removedirs", "renames"}  # os.<f>, shutil.move
_WRITE_FLAGS = ("O_CREAT", "O_WRONLY", "O_RDWR", "O_TRUNC", "O_APPEND")


def _name(func: ast.expr) -> str | None:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def _owner(func: ast.expr) -> str | None:
    return ast.unparse(func.value) if isinstance(func, ast.Attribute) else None


def _mode(call: ast.Call, pos: int) -> str | None:
    """The mode argument when it is a string literal (``open(p, "wb")``, ``mode="r+"``), else None."""
    node = next((k.value for k in call.keywords if k.arg == "mode"), call.args[pos] if len(call.args) > pos else None)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return "?" if node is not None else None  # a computed mode: treat as possibly writing


def is_site(call: ast.Call) -> bool:
    """Whether ``call`` creates, replaces, truncates or deletes a path by itself."""
    name, owner = _name(call.func), _owner(call.func)
    if name is None:
        return False
    if name == "open":
        if owner == "os":
            flags = ast.unparse(call.args[1]) if len(call.args) > 1 else ""
            return any(f in flags for f in _WRITE_FLAGS)
        if owner == "zarr":
            return (_mode(call, 99) or "a") != "r"
        if owner in (None, "gzip", "io", "builtins", "bz2", "lzma"):
            mode = _mode(call, 1)
        elif call.args and isinstance(call.args[0], ast.Constant):
            mode = _mode(call, 0)  # Path.open("w")
        else:
            return False  # Image.open(path), safe_open(...): readers
        return mode is not None and any(c in mode for c in "wax+?")
    if name in ("open_group", "open_array", "create_group", "create_array") and owner == "zarr":
        if call.args and isinstance(call.args[0], ast.Call) and _name(call.args[0].func) == "MemoryStore":
            return False  # an array in memory (the cache's layout check): no path is touched
        return (_mode(call, 99) or "a") != "r"
    if name == "ZipFile":
        return (_mode(call, 1) or "r") != "r"
    if name in _WRITE_METHODS and owner is not None:
        return True
    if name in _WRITE_FUNCS:
        return True
    if owner == "os" and name in _OS_PATH_FUNCS | {"truncate", "chmod", "symlink", "link"}:
        return True
    if owner == "shutil" and name in {"move", "copy", "copy2", "copyfile", "copytree", "rmtree"}:
        return True
    if owner == "torch" and name == "save" or owner == "np" and name == "save":
        return True
    if name == "save" and owner is not None and call.args:  # PIL Image.save(path), and the like
        return True
    if name in ("rename", "replace") and owner is not None and owner not in ("os", "dataclasses") \
            and len(call.args) == 1 and not call.keywords:  # Path.rename/replace(target); str.replace has 2 args
        return True
    return False


def _refs(node: ast.AST) -> set[str]:
    """Names and ``self.x`` attributes an expression mentions."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(ast.unparse(n))
    return out


def _calls_binder(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) and _name(n.func) in BINDERS for n in ast.walk(node))


def _claimed(scope: ast.AST, inherited: set[str]) -> set[str]:
    """Names bound in ``scope`` to a path or handle the mechanism handed out (to a fixed point)."""
    claimed = set(inherited)
    while True:
        before = len(claimed)
        for n in ast.walk(scope):
            if isinstance(n, (ast.With, ast.AsyncWith)):
                for item in n.items:
                    if item.optional_vars is not None and (
                            _calls_binder(item.context_expr) or _refs(item.context_expr) & claimed):
                        claimed |= _refs(item.optional_vars)
            elif isinstance(n, ast.Assign) and (_calls_binder(n.value) or _refs(n.value) & claimed):
                for t in n.targets:
                    claimed |= {ast.unparse(t)} if isinstance(t, ast.Attribute) else _refs(t)
        if len(claimed) == before:
            return claimed


def _target_refs(call: ast.Call) -> set[str]:
    refs = set().union(*(_refs(a) for a in call.args), *(_refs(k.value) for k in call.keywords)) if (
        call.args or call.keywords) else set()
    if isinstance(call.func, ast.Attribute):
        refs |= _refs(call.func.value)
    return refs


def _calls_with_functions(tree: ast.AST):
    """Every call with the stack of functions around it (innermost last), in one pass."""
    stack: list[ast.AST] = []

    def visit(node):
        if isinstance(node, ast.Call):
            yield node, list(stack)
        is_func = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        if is_func:
            stack.append(node)
        for child in ast.iter_child_nodes(node):
            yield from visit(child)
        if is_func:
            stack.pop()

    yield from visit(tree)


@functools.lru_cache(maxsize=None)
def _modules(root: Path) -> tuple[tuple[str, ast.Module], ...]:
    return tuple((p.relative_to(root).as_posix(), ast.parse(p.read_text(encoding="utf-8")))
                 for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py")))


@functools.lru_cache(maxsize=None)
def _sites(root: Path) -> tuple:
    return tuple(find_sites(root))


def find_sites(root: Path = ROOT) -> list[tuple[str, int, str, str, bool]]:
    """(file, line, function, call, accepted) for every site in the package under ``root``."""
    found = []
    for rel, tree in _modules(root):
        module_claimed = None
        claimed_in: dict[ast.AST, set[str]] = {}
        for call, funcs in _calls_with_functions(tree):
            if not is_site(call):
                continue
            func = funcs[-1] if funcs else None
            if module_claimed is None:  # attributes (self._cm, self._tmp) claimed in one method count in all
                module_claimed = {c for c in _claimed(tree, set()) if "." in c}
            if func is not None and func not in claimed_in:
                claimed_in[func] = _claimed(func, module_claimed)
            ok = (rel == "nucseg/io.py" and bool({f.name for f in funcs} & INTERNALS)) \
                or _name(call.func) in BINDERS \
                or any(_calls_binder(a) for a in [*call.args, *(k.value for k in call.keywords)]) \
                or (func is not None and bool(_target_refs(call) & claimed_in[func]))
            found.append((rel, call.lineno, func.name if func else "<module>", ast.unparse(call)[:100], ok))
    return found


def test_every_writer_states_what_it_may_replace():
    """atomic_path, write_json and write_text take the ``owned`` predicate by name or position, at every call."""
    missing = []
    for rel, tree in _modules(ROOT):
        for call, _ in _calls_with_functions(tree):
            name = _name(call.func)
            given = any(k.arg == "owned" for k in call.keywords) or (
                name in ("write_json", "write_text") and len(call.args) >= 3)
            if name in ("atomic_path", "write_json", "write_text", "check_output") and not given \
                    and not (name == "check_output" and len(call.args) >= 2) \
                    and not (isinstance(call.func, ast.Attribute) and call.func.attr == "write_text"):
                missing.append(f"{rel}:{call.lineno}: {ast.unparse(call)[:90]}")
    assert not missing, "calls without an owned predicate:\n" + "\n".join(missing)


def test_every_write_and_delete_goes_through_the_ownership_mechanism():
    sites = _sites(ROOT)
    bad = [f"{f}:{line} in {fn}(): {src}" for f, line, fn, src, ok in sites if not ok]
    assert not bad, ("writes or deletes that bypass nucseg.io's ownership mechanism (write through atomic_path / "
                     "write_json / write_text / save_png, delete with remove_owned, append with open_append):\n"
                     + "\n".join(bad))


def test_the_walk_finds_the_sites_it_must():
    """Control: the known writers are found, so an empty result above means something."""
    sites = {(f, fn) for f, _, fn, _, _ in _sites(ROOT)}
    for expected in [("nucseg/model/adapter.py", "save_adapter"), ("nucseg/model/adapter.py", "export_merged"),
                     ("nucseg/wsi/export.py", "write_ome_zarr_labels"), ("nucseg/model/weights.py", "fetch"),
                     ("nucseg/learn/datasets.py", "fetch_dataset"), ("nucseg/io.py", "remove_owned"),
                     ("nucseg/wsi/cache.py", "_open_group"), ("nucseg/learn/train.py", "save_training_state")]:
        assert expected in sites, expected


def test_the_rule_catches_a_direct_write(tmp_path):
    """Control: a module writing its output directly is flagged; through atomic_path it is not."""
    bad = ast.parse("def f(out):\n    with open(out, 'w') as fh:\n        fh.write('x')\n")
    good = ast.parse("def f(out):\n    with atomic_path(out, owned=new_only) as tmp, open(tmp, 'w') as fh:\n"
                     "        fh.write('x')\n")
    for tree, want in ((bad, False), (good, True)):
        func = tree.body[0]
        [call] = [n for n in ast.walk(func) if isinstance(n, ast.Call) and is_site(n)]
        assert bool(_target_refs(call) & _claimed(func, set())) is want
    assert is_site(ast.parse("p.unlink()").body[0].value) and is_site(ast.parse("shutil.rmtree(p)").body[0].value)
    assert not is_site(ast.parse("s.replace('a', 'b')").body[0].value)
