import sys

from captum_krypton.cli import main

sys.exit(main())
