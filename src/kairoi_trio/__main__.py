import sys

from kairoi_trio.cli import main

sys.exit(main())
