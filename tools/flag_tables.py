"""Print the README's flag tables from the scripts' own parsers: `python tools/flag_tables.py`."""
import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPTS = ("train", "val", "predict", "export_model", "infer")


def table(parser: argparse.ArgumentParser) -> str:
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flags = ", ".join(f"`{flag}`" for flag in action.option_strings)
        default = "" if action.default in (None, argparse.SUPPRESS) else f"`{action.default}`"
        if action.choices:
            flags += " (" + "\\|".join(str(c) for c in action.choices) + ")"
        lines.append(f"| {flags} | {default} | {(action.help or '').replace('|', '/')} |")
    return "\n".join(lines)


def main():
    for script in SCRIPTS:
        try:
            module = importlib.import_module(script)
        except ImportError:
            continue
        print(f"#### `{script}.py`\n\n{table(module.build_parser())}\n")


if __name__ == "__main__":
    main()
