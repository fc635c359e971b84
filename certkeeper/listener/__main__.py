"""``python -m certkeeper.listener FD``: see certkeeper.listener.process."""

import logging
import os
import sys

from certkeeper.listener.process import main

status = main()
logging.shutdown()  # the sockets are closed; the interpreter's teardown would only cost time
sys.stderr.flush()
os._exit(status)
