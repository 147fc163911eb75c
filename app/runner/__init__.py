"""A runner: a child process serving one model in one mode on a Unix socket (OpenAI routes)."""

from pathlib import Path

# The working directory for ``python -m app.runner`` (and ``app.runner.probe``) children: where
# the ``app`` package is importable from, whether installed or run from a checkout.
SOURCE_ROOT = Path(__file__).resolve().parent.parent.parent
