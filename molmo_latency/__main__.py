import sys

from molmo_latency.cli.main import main

sys.exit(main())
