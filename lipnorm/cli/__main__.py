"""``python -m lipnorm.cli``: the ``lipnorm`` command."""

import sys

from lipnorm.cli import main

sys.exit(main())
