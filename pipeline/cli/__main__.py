"""`python -m pipeline.cli …` runs `lol …`."""

import sys

from pipeline.cli import main

sys.exit(main())
