import sys

from certkeeper.cli import main

sys.exit(main())
