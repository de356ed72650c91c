import sys

from raytrain_cls.entry import main

sys.exit(main())
