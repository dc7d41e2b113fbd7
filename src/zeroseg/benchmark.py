"""``python -m zeroseg.benchmark <name> [key=value ...]``: the command line of :mod:`zeroseg.toy.benchmark`."""

from zeroseg.toy.benchmark import main

if __name__ == "__main__":
    main()
