"""`python -m lgd ...` is the `lgd` command (torchrun launches it this way: `torchrun ... -m lgd train ...`)."""
import sys

from lgd.cli import main

sys.exit(main())
