import sys

from pipeline.plan.cli import main

sys.exit(main())
