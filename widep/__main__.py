"""``python -m widep`` runs the CLI."""

import sys

from widep.cli import main

sys.exit(main())
