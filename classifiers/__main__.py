"""`python -m classifiers`: the same command line as the `classifiers` console script."""

from classifiers.cli import main

raise SystemExit(main())
