"""``python -m certkeeper.listener FD``: see certkeeper.listener.process."""

import sys

from certkeeper.listener.process import main

sys.exit(main())
