"""docs/layout.md lists every module of the package: a module added without its line fails here."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _package_tree():
    """(folder, file) of every .py under itpn_d2/, as the snippet in docs/layout.md walks it."""
    found = set()
    for root, dirs, files in os.walk(os.path.join(ROOT, "itpn_d2")):
        rel = os.path.relpath(root, ROOT)
        if "configs" in rel.split(os.sep) or "__pycache__" in rel:
            continue
        found.update((rel, f) for f in files if f.endswith(".py"))
    return found


def _documented_tree():
    text = open(os.path.join(ROOT, "docs", "layout.md")).read()
    block = re.search(r"```\n(itpn_d2/\n.*?)```", text, re.S).group(1)
    stack, found = [], set()
    for line in block.splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        if name.endswith("/"):
            stack = stack[:depth] + [name[:-1]]
        else:
            found.add((os.path.join(*stack[:depth]), name))
    return found


def test_layout_lists_every_module():
    package, documented = _package_tree(), _documented_tree()
    missing = sorted(os.path.join(*p) for p in package - documented)
    stale = sorted(os.path.join(*p) for p in documented - package)
    assert not missing and not stale, (
        f"docs/layout.md is out of date: modules not listed {missing}, listed but gone {stale} "
        "(regenerate the list with the snippet at the end of docs/layout.md)"
    )
