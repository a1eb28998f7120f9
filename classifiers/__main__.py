import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's C++ start-up notices are not for users

from classifiers.cli import main  # noqa: E402

raise SystemExit(main())
