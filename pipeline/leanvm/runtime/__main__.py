"""python3 out/leanvm-runtime.pyz VERB ...: see leanvm.runtime.cli."""

import sys

from leanvm.runtime.cli import main

sys.exit(main(sys.argv[1:]))
