"""``python -m neuronmerge``: the same command line as the ``neuronmerge`` script."""

import sys

from neuronmerge.cli import main

sys.exit(main())
