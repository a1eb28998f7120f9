from classifiers.cli import main

raise SystemExit(main())
