#!/usr/bin/env python
"""What a reader of finetune_electra.py reads to follow the default IPU run from main().

    python benchmarks/reading_path.py            # figures, the file's outline
    python benchmarks/reading_path.py --path     # and every function in reading order

It runs the tutorial's flow (--device ipu, the default 4 stages, 8 device iterations,
batch 4) for one epoch on the PopTorch stand-in of tests/ (NOT PopTorch), a tiny random
ELECTRA and 400 synthetic reviews, and records each function and method of the script
as it is first called: that is the order a reader meets them in. It prints:
  functions  how many are called; lines: their lines in all
  places     where the reader lands: a function that does not directly follow the last one
  jumps      landings more than 100 lines from the one before
for the whole run, and for part one alone (above the "beyond the tutorial" banner: the
reader who leaves part two's helpers for later), and the outline of the file: each part
(its section headings) with its line range.
"""

import argparse
import ast
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import conftest  # noqa: E402
import finetune_electra as fe  # noqa: E402
import poptorch_standin  # noqa: E402

SCRIPT = Path(fe.__file__).resolve()
FAR = 100  # lines: a jump the reader has to search for


def definitions():
    """{first line (its decorator's, if any): (qualified name, first line, last line)}."""
    found = {}

    def visit(nodes, prefix):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                found[first] = (prefix + node.name, first, node.end_lineno)
                if isinstance(node, ast.ClassDef):
                    visit(node.body, f"{node.name}.")
    visit(ast.parse(SCRIPT.read_text()).body, "")
    return found


def reading_order(argv):
    """The script's functions in the order the run first calls them, from main() on."""
    known, order, seen = definitions(), [], set()

    def on_call(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_filename == str(SCRIPT) and code.co_firstlineno in known:
            if code.co_firstlineno not in seen:
                seen.add(code.co_firstlineno)
                order.append(known[code.co_firstlineno])
    sys.setprofile(on_call)
    try:
        fe.main(argv)
    finally:
        sys.setprofile(None)
    return order


def outline():
    """(heading, first line) of the file's parts: its numbered section headings and banners."""
    lines = SCRIPT.read_text().splitlines()
    heads = []
    for i, line in enumerate(lines):
        if re.match(r"# =+$|# -+$", line) and i + 1 < len(lines) and \
                re.match(r"# (\w|\d+\.)", lines[i + 1]) and not lines[i - 1].startswith("#"):
            heads.append((lines[i + 1][2:], i + 1))
    return [("docstring and imports", 1)] + heads, len(lines)


def walk(order):
    """(function, whether the reader lands there, whether that is a far jump) in order.
    A reader lands on a function unless it starts right below the one before."""
    last = None
    for name, first, end in order:
        lands = last is None or not (0 <= first - last[2] <= 3)
        yield (name, first, end), lands, lands and last is not None and abs(first - last[1]) > FAR
        last = (name, first, end)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", action="store_true", help="print the reading order")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    conftest.save_tiny_model(tmp / "model")  # the tests' tiny_model_dir and sentiment_dir
    conftest.save_sentiment_data(tmp / "data")
    poptorch_standin.reset()
    fe.poptorch = poptorch_standin
    order = reading_order(["--device", "ipu", "--model", str(tmp / "model"), "--dataset",
                           str(tmp / "data"), "--output-dir", str(tmp / "run"),
                           "--max-length", "64", "--epochs", "1"])

    banner = next(i + 1 for i, line in enumerate(SCRIPT.read_text().splitlines())
                  if re.match(r"# (Part two: b|B)eyond the tutorial$", line))
    rows = [f"{first:>6}-{end:<6} {'jump' if far else '':<5}{name}"
            for (name, first, end), _, far in walk(order)]
    above = [o for o in order if o[1] < banner]
    if args.path:
        print("reading order (first line-last line):")
        print("\n".join(rows))
    heads, total = outline()
    print(f"\noutline of {SCRIPT.name} ({total} lines; banner at line {banner}):")
    for (head, first), nxt in zip(heads, heads[1:] + [("", total + 1)]):
        print(f"  {first:>5}-{nxt[1] - 1:<5} {head}")
    for what, path in (("the whole run", order), (f"part one only (lines 1-{banner - 1})", above)):
        steps = list(walk(path))
        print(f"following the IPU run from main(), {what}: {len(path)} functions and methods, "
              f"{sum(end - first + 1 for _, first, end in path)} lines, "
              f"{sum(lands for _, lands, _ in steps)} places, "
              f"{sum(far for _, _, far in steps)} jumps of more than {FAR} lines")
    main_line = next(first for name, first, _ in order if name == "main")
    ipu_line = next(first for name, first, _ in order if name == "finetune_on_ipus")
    print(f"main() at line {main_line}, finetune_on_ipus() at line {ipu_line}")


if __name__ == "__main__":
    main()
