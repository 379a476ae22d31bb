"""``python -m archopt.cli``: the ``archopt`` command."""

from archopt.cli import run

run()
