"""`python -m extractor`: the same command line as the `extractor` console script."""

from extractor.cli import main

raise SystemExit(main())
