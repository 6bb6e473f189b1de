import sys

from minisgl.cli import main

sys.exit(main())
