"""`python -m diffalign.cli ...` (and `accelerate launch -m diffalign.cli ...`): the `diffalign` command."""

import sys

from diffalign.cli import main

sys.exit(main())
