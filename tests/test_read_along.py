"""The script reads as the tutorial (issue 20): part one, above a banner, is the tutorial
in its order, and the README's map of the file says where each part and section is."""

import ast
import re

from conftest import ROOT

SCRIPT = (ROOT / "finetune_electra.py").read_text()
LINES = SCRIPT.splitlines()
BANNER = LINES.index("# Part two: beyond the tutorial") + 1
TUTORIAL_CALLS = {"load_dataset", "BeginBlock", "Options", "identity_loss", "trainingModel",
                  "inferenceModel", "attachToDevice"}


def top_level():
    """{name: (first line, last line, names it calls)} for the script's functions and classes."""
    found = {}
    for node in ast.parse(SCRIPT).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            calls = {n.func.attr if isinstance(n.func, ast.Attribute) else n.func.id
                     for n in ast.walk(node) if isinstance(n, ast.Call)
                     and isinstance(n.func, (ast.Attribute, ast.Name))}
            found[node.name] = (node.lineno, node.end_lineno, calls)
    return found


def sections():
    """{'3': (first line, last line)} of each numbered section: from its heading's rule to
    the last line before the next section or banner."""
    starts = [i for i, line in enumerate(LINES[:-1])
              if re.match(r"# [-=]{76}$", line) and re.match(r"# (\d+\.|Part two)", LINES[i + 1])]
    found = {}
    for start, end in zip(starts, starts[1:] + [len(LINES)]):
        number = re.match(r"# (\d+)\.", LINES[start + 1])
        while not LINES[end - 1].strip():
            end -= 1
        if number:
            found[number.group(1)] = (start + 1, end)
    return found


def test_the_tutorial_and_its_calls_are_above_the_banner():
    defs = top_level()
    making_tutorial_calls = {name for name, (_, _, calls) in defs.items() if calls & TUTORIAL_CALLS}
    assert {"load_splits", "read_files", "place_on_ipus", "ipu_options", "IPUWrapper",
            "finetune_on_ipus"} <= making_tutorial_calls
    for name in making_tutorial_calls | {"main", "finetune", "tokenize", "load_model"}:
        assert defs[name][1] < BANNER, f"{name} ends at line {defs[name][1]}, banner {BANNER}"
    assert BANNER <= 460


def test_no_function_is_over_80_lines_and_no_class_over_100():
    sizes = [(n, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(SCRIPT))
             if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    long = [(n.name, size) for n, size in sizes if isinstance(n, ast.FunctionDef) and size > 80]
    large = [(n.name, size) for n, size in sizes if isinstance(n, ast.ClassDef) and size > 100]
    assert long == [] and large == []


def test_each_flow_shows_its_epoch_loop_and_step_loop_itself():
    """As nanoGPT's train.py: a reader sees in one function what an epoch and a step do."""
    for node in ast.parse(SCRIPT).body:
        if isinstance(node, ast.FunctionDef) and node.name in ("finetune_on_ipus",
                                                               "finetune_with_torch"):
            epoch_loops = [n for n in node.body if isinstance(n, ast.For)
                           and "epochs" in ast.get_source_segment(SCRIPT, n.iter)]
            assert len(epoch_loops) == 1, node.name
            step_loops = [n for n in ast.walk(epoch_loops[0]) if isinstance(n, ast.For)]
            assert len(step_loops) >= 2, node.name  # training steps, then evaluation or its call


def test_the_docstring_and_the_readme_map_match_the_file():
    assert f'banner "Part two" at line {BANNER},' in SCRIPT
    readme = (ROOT / "README.md").read_text()
    assert f"**Part one: the tutorial, lines 1–{BANNER - 1}**" in readme
    assert f"**Part two: beyond the tutorial, lines {BANNER}–{len(LINES)}**" in readme
    rows = re.findall(r"^\| (\d+)–(\d+) \| (\d+)\. ", readme, re.M)
    assert {number: (int(first), int(last)) for first, last, number in rows} == sections()
