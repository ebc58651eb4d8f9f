"""``python -m synthdistill`` (what torchrun launches with ``-m synthdistill``)."""

from synthdistill.cli import main

if __name__ == "__main__":
    main()
