"""How the command line reports an error: `error: <message>`, the message exactly as it is.

The message is plain text, not rich markup (a value quoted from a bad data row such as `[bold]` or a
`[Errno 2]` stays in the message), and it is not folded at the terminal's width (a file path in it can be
copied whole, and a log keeps it on one line).
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text


def print_error(console: Console, message: object) -> None:
    console.print(Text.assemble(("error:", "red"), " ", str(message)), soft_wrap=True)
