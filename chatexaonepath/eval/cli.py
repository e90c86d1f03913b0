"""`chatexaonepath eval …` commands (joined into the one CLI by chatexaonepath/cli.py).

Heavy imports stay inside the commands so `chatexaonepath --help` stays fast.
"""

from __future__ import annotations

import typer

app = typer.Typer(help="Seven-criteria LLM-judge evaluation of answers against reports.", no_args_is_help=True)
