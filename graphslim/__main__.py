"""``python -m graphslim ...``: the same command line as the ``graphslim`` console script."""

from graphslim.cli import main

if __name__ == "__main__":
    main()
