"""PyInstaller's entry script: the bundle's ``fluidity`` executable runs ``desktop.bundle_main``."""

import sys

from desktop.bundle_main import main

if __name__ == "__main__":
    sys.exit(main())
