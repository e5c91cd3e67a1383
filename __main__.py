"""`python -m dpal`: the `dpal` command line, for an environment without the console script."""

from dpal.cli import main

main()
