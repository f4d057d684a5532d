"""``python -m edgeslim``: the same command line as the ``edgeslim`` script."""

from edgeslim.cli import console_main

console_main()
