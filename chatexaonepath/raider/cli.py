"""`chatexaonepath raider …` commands (joined into the one CLI by chatexaonepath/cli.py).

Heavy imports stay inside the commands so `chatexaonepath --help` stays fast.
"""

from __future__ import annotations

import typer

app = typer.Typer(help="RAIDER: pathology reports → retrieval → instruction data.", no_args_is_help=True)
