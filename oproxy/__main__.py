"""``python -m oproxy``: the ``oproxy`` command, where no script is installed."""

from oproxy.cli import main

if __name__ == "__main__":
    main()
