import sys

from ptcl.cli import main

sys.exit(main())
