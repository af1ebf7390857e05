"""`python -m reasonrl ...` is the `reasonrl` console script."""
from reasonrl.cli import main

main()
