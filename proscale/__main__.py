"""`python -m proscale ...` (what `torchrun -m proscale train ...` runs)."""
import sys

from proscale.cli import main

sys.exit(main())
