"""`python -m costgraph`: the command line (`costgraph.app.cli`); an entry point, part of the app floor."""
import sys

from costgraph.app.cli import main

sys.exit(main())
