"""`chatexaonepath train …` commands (joined into the one CLI by chatexaonepath/cli.py).

Heavy imports stay inside the commands so `chatexaonepath --help` stays fast.
"""

from __future__ import annotations

import typer

app = typer.Typer(help="Two-phase training: alignment (LLM frozen), then LoRA instruction tuning.", no_args_is_help=True)
