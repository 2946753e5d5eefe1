"""mkdocs hook: replaces `<!-- cli-reference -->` in a page by the `convlens` command's own help,
generated from its argparse parser at build time, so the reference cannot drift from the code."""

from __future__ import annotations

import argparse
import os

MARKER = "<!-- cli-reference -->"


def _help(parser: argparse.ArgumentParser) -> str:
    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal width; fix it for the page
    return parser.format_help().rstrip()


def cli_reference() -> str:
    from convlens.cli import build_parser

    parser = build_parser()
    parts = ["## `convlens`", "", "```text", _help(parser), "```"]
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        parts += ["", f"## `convlens {name}`", "", "```text", _help(sub), "```"]
    return "\n".join(parts) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 (mkdocs' signature)
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, cli_reference())
    return markdown
