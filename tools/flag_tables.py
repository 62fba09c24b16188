"""Print the README's flag tables from the scripts' own parsers: `python -m tools.flag_tables`."""
import argparse
import importlib


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
