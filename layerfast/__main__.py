"""`python -m layerfast ...` is the `layerfast` command."""

import sys

from layerfast.cli import main

sys.exit(main())
