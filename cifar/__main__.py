"""`python -m cifar`: the command line, as `python main.py` (how `sweep` starts each trial's `fit`)."""

from cifar.cli import main

main()
