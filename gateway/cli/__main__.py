"""`python -m gateway.cli …`: what the drills use to run the gateway as a separate process."""

from gateway.cli import main

main()
