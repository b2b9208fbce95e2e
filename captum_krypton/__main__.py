import sys

from captum_krypton.cli import main

try:
    sys.exit(main())
except KeyboardInterrupt:  # before a rank could say where it stopped (imports)
    rank = __import__("os").environ.get("RANK", "0")
    sys.stdout.write(f"rank {rank}: interrupted while starting; the same command resumes\n")
    sys.exit(130)
