"""``python -m tuneqn.agent`` runs the agent daemon."""

import sys

from tuneqn.agent.cli import main

if __name__ == "__main__":
    sys.exit(main())
