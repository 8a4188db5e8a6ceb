import sys

from lightning_app.cli import main

sys.exit(main())
