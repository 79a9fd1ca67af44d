"""`python -m sunfish ...`: the same as the `sunfish` command."""

from sunfish.cli import main

if __name__ == "__main__":
    main(prog_name="sunfish")
