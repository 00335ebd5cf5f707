import sys

from nvium_dist.serving.server import main

sys.exit(main())
