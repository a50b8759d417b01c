"""Run otcompress from a checkout: `python cli.py fuse ...`."""
from otcompress.cli import main

if __name__ == "__main__":
    main()
