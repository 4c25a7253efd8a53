import sys

from molmo_latency.cli.main import console

sys.exit(console())
