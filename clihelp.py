"""The `--help` pages of the dpal commands: options grouped in panels, laid out to read at 80 columns.

typer's own pages put every option in one table of five columns (name, short name, `--no-` name,
type, help), so that in an 80-column terminal the help text of a command with long option names
was squeezed into a column of about 20 characters. Here each panel (its name is the field's
`panel` in config.py, or an option's `rich_help_panel`) is a table of two columns: the option with
its `--no-` form and its value's shape, at most `NAME_WIDTH` wide, and the help text in the rest;
a longer option gets a row of its own and its help goes on the next row. Flags show no value type
(typer printed `<bool>`), and paragraphs of a command's docstring are reflowed to the terminal.
"""

from __future__ import annotations

import re
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from typer.core import TyperArgument, TyperCommand, TyperGroup

from dpal.config import (
    PANEL_CONFIG,
    PANEL_DATA,
    PANEL_METHOD,
    PANEL_OPTIMISER,
    PANEL_RECIPES,
    PANEL_RUNTIME,
    PANEL_SCHEDULE,
    PANEL_TEACHER,
    PANEL_VALIDATION,
    PANEL_VIEWS,
)

NAME_WIDTH = 30  # the option column's widest; the help column keeps the rest (46 of 80 columns)
DEFAULT_PANEL = "Options"
# typer's names of a value's type, as the config's options spell them (a list option is repeated)
_TYPE_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "list[int]": "INTEGER", "list[str]": "TEXT"}
# the panels in the order a page lists them (any other after them, the default one last)
PANEL_ORDER = (
    "Arguments",
    PANEL_DATA,
    PANEL_TEACHER,
    PANEL_VIEWS,
    PANEL_SCHEDULE,
    PANEL_OPTIMISER,
    PANEL_METHOD,
    PANEL_RECIPES,
    PANEL_VALIDATION,
    PANEL_RUNTIME,
    PANEL_CONFIG,
)


def _console() -> Console:
    return Console(highlight=False, soft_wrap=False)


def _description(text: str) -> Text:
    """A docstring's paragraphs, each reflowed to one line (the terminal wraps it), blank lines kept."""
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", (text or "").strip())]
    return Text.from_markup("\n\n".join(p for p in paragraphs if p))


def _type_label(param: Any, ctx: Any) -> str:
    """The value's shape: the option's metavar (INTEGER, [a|b]), or typer's `<int>` as INT; none for flags."""
    if getattr(param, "is_flag", False):
        return ""
    label = param.display_type_rich(ctx=ctx) or ""
    return re.sub(r"<([^>]*)>", lambda m: _TYPE_NAMES.get(m.group(1), m.group(1).upper()), label)


def _name(param: Any, ctx: Any) -> str:
    if isinstance(param, TyperArgument):
        return param.display_name_raw.upper()
    names = [*param.opts, *param.secondary_opts]
    longs = [n for n in names if n.startswith("--")] + [n for n in names if not n.startswith("--")]
    return " / ".join(longs) + (f" {label}" if (label := _type_label(param, ctx)) else "")


def _help(param: Any) -> Text:
    text = Text.from_markup(" ".join((param.help or "").split()))
    default = getattr(param, "default", None)
    if (
        getattr(param, "show_default", None) is not False
        and not getattr(param, "is_flag", False)
        and default not in (None, "", ())
        and not isinstance(param, TyperArgument)
        and "[default:" not in text.plain
    ):
        text.append(f" [default: {default}]")
    if param.required:
        text.append(" [required]")
    return text


def _panel(title: str, rows: list[tuple[str, Text]], console: Console) -> None:
    """One panel: a two-column row per option, or the option's own line and its help below when it
    is wider than `NAME_WIDTH` (one table per row, all with the same first column, so they align)."""
    width = min(NAME_WIDTH, max(len(name) for name, _ in rows))
    parts: list[Any] = []
    for name, text in rows:
        table = Table.grid(padding=(0, 2), expand=True)
        table.add_column(width=width, no_wrap=True)
        table.add_column(ratio=1)
        if len(name) > width:
            parts.append(Text(name))
            table.add_row("", text)
        else:
            table.add_row(Text(name), text)
        parts.append(table)
    console.print(Panel(Group(*parts), title=title, title_align="left", border_style="dim"))


def print_help(command: Any, ctx: Any) -> None:
    """The whole page: usage, description, each panel of options (in the order first met), commands."""
    console = _console()
    usage = re.sub(r"\{(\w+)\}", lambda m: m.group(1).upper(), command.get_usage(ctx).rstrip())
    console.print(Text(usage))  # typer writes a required argument as {name}
    console.print()
    if command.help:
        console.print(_description(command.help))
        console.print()
    panels: dict[str, list[tuple[str, Text]]] = {}
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False) or (isinstance(param, TyperArgument) and not param.help):
            continue
        title = "Arguments" if isinstance(param, TyperArgument) else param.rich_help_panel or DEFAULT_PANEL
        panels.setdefault(title, []).append((_name(param, ctx), _help(param)))
    order = {title: i for i, title in enumerate(PANEL_ORDER)}
    for title in sorted(panels, key=lambda t: order.get(t, len(order) - (t == DEFAULT_PANEL))):
        _panel(title, panels[title], console)
    if isinstance(command, TyperGroup):
        rows = [
            (name, _description(sub.help or "").split("\n")[0])
            for name in command.list_commands(ctx)
            if (sub := command.get_command(ctx, name)) is not None and not sub.hidden
        ]
        _panel("Commands", rows, console)


class Command(TyperCommand):
    """A dpal command: typer's, with `print_help`'s page."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        print_help(self, ctx)


class CommandGroup(TyperGroup):
    """A dpal command group: typer's, with `print_help`'s page."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        print_help(self, ctx)
