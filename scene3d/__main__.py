import sys

from scene3d.cli import main

sys.exit(main())
