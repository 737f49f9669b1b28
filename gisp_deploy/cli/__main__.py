"""`python -m gisp_deploy.cli`: the command line (torchrun launches it this way)."""

from . import main

main()
