import sys

from layerfold.cli.main import main

sys.exit(main())
