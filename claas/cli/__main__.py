"""`python -m claas.cli`: the `claas` command, as a module (tests and the image run it so)."""

import sys

from claas.cli import main

sys.exit(main())
