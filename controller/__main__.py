"""``python -m tuneqn.controller`` = ``tuneqn``."""

import sys

from tuneqn.controller.cli import main

sys.exit(main())
